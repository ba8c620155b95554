"""Whole-image and whole-slide prediction (issue: prediction by patch voting) -- not yet available."""

import sys

if __name__ == "__main__":
    sys.exit("predict.py is not implemented yet: whole-image voting and slide maps land with the prediction issue. "
             "Meanwhile `python train.py` reports image-patch test metrics per fold.")
