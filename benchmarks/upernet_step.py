"""Swin-UperNet: forward+backward time and peak memory per image at crop 480 on this CPU for the
tiny and Swin-T models, and Swin-L UperNet's parameter count next to the published ~234M."""

from model_step import print_metrics, step_report

if __name__ == "__main__":
    print_metrics(step_report("upernet", 234))
