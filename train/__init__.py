"""Training and sampling scripts: train/train.py, train/sample.py (run them as scripts).

This file makes `train` a regular package, so `import train.config` finds this folder
even though the script train/train.py sits on sys.path when it runs.
"""
