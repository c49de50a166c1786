"""Train a GPT with fastgpt: ``python train.py --help`` lists the options."""
import sys

from fastgpt.train import main

if __name__ == "__main__":
    sys.exit(main())
