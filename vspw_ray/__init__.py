"""vspw_ray: the VSPW 2021 recipe as a Ray service."""
__version__ = "0.1.0"
