# Where the Binder and Colab badges (README.md and every notebook) and the notebooks' Colab install cell point:
# the GitHub repository (owner/name) and its branch or tag.  To point them at a fork or pin a release, run
#   make badges REPO=myorg/nnlab REF=v0.1.0
# which rewrites this file and every badge and link at once (binder/badges.py).
REPO = nnlab/nnlab
REF = main
