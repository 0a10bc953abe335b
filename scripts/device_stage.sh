#!/usr/bin/env bash
# Run on the lent GPU machine. Large files cannot travel in one call (64 MiB), so they are split here
# into .carry/<name>.partNN chunks and sent over back-to-back calls; each call runs this script, which
# copies the chunks it got into a staging folder that survives between calls while the machine is warm,
# and joins a file once all its chunks are there.
#   bash scripts/device_stage.sh            # stage what .carry holds, join what is complete
# Layout on the device: ~/stage/<name>.partNN -> ~/lcache/<name> (LINEARIZE_CACHE-relative path).
set -euo pipefail
STAGE=~/stage
CACHE=~/lcache
mkdir -p "$STAGE" "$CACHE"
if compgen -G ".carry/*" > /dev/null; then cp -n .carry/* "$STAGE"/ 2>/dev/null || true; fi
# <name>.count tells how many parts <name> has; '__' in a name stands for '/'.
for count in "$STAGE"/*.count; do
  [ -e "$count" ] || continue
  name=$(basename "$count" .count)
  want=$(cat "$count")
  have=$(ls "$STAGE/$name".part* 2>/dev/null | wc -l)
  target="$CACHE/${name//__//}"
  if [ "$have" -eq "$want" ] && [ ! -e "$target" ]; then
    mkdir -p "$(dirname "$target")"
    cat $(ls "$STAGE/$name".part* | sort) > "$target.tmp" && mv "$target.tmp" "$target"
    echo "joined $target ($(stat -c %s "$target") bytes)"
    case "$target" in *.tar.gz) tar -xzf "$target" -C "$CACHE" && echo "unpacked $target";; esac
  fi
done
# Python packages the image lacks (transformers >= 5.23, gguf) travel as wheels in .whl
if compgen -G ".whl/*.whl" > /dev/null && [ ! -e /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.done
fi
