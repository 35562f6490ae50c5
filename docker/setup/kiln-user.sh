#!/bin/sh
# The user and folders of every kiln image, run as root while the image is built (RUN --mount of this
# file), so the runtime, GPU and VS Code images set them up from one place:
# - uid/gid 2222 as in the template: `chgrp -R 2222 models outputs` on the host opens a mounted dir to it;
# - the template's layout, which its guides' commands and mounts name: home /home/aisg, the repo in
#   /home/aisg/kiln (the working dir), models mounted at /home/aisg/from-gcs;
# - /home/kiln (and its models/) as links, for manifests written for kiln's earlier layout.
set -eu
groupadd --gid 2222 kiln
useradd --no-log-init --create-home --home-dir /home/aisg --uid 2222 --gid 2222 --shell /bin/bash kiln
install -d -o kiln -g kiln /home/aisg/kiln /home/aisg/from-gcs
ln -s /home/aisg /home/kiln
ln -s from-gcs /home/aisg/models
