import sys

from vspw_ray.cli import main

sys.exit(main())
