#!/usr/bin/env bash
# Regenerates README's pictures with the runtime (release build of the `unsee` CLI, CPU, fixed seeds):
#   docs/shapes-all.png     the embedded model, one image per colour × shape pair (rows: red … purple;
#                           columns: circle, square, triangle, star, cross, ring), held-out template
#   docs/shapes-circle.png  six prompts before (top) and after (bottom) erasing "circle" → square with UCE
# Usage: docs/make-pictures.sh   (from anywhere; about a minute after the build)
set -euo pipefail
cd "$(dirname "$0")/.."
unsee() { cargo run --release --quiet -- "$@"; }

# "an image of a {}" is a template held out of training.
all=()
for colour in red orange yellow green blue purple; do
  for shape in circle square triangle star cross ring; do
    article=a; [[ $colour == orange ]] && article=an
    all+=(--prompt "an image of $article $colour $shape")
  done
done
unsee grid --device cpu --guidance 4 --scale 3 --columns 6 "${all[@]}" --out docs/shapes-all.png

unsee grid --device cpu --guidance 4 --scale 4 --spec models/specs/shapes-circle.toml \
  --prompt "an image of a red circle" --prompt "a rendering of a blue circle" --prompt "there is a yellow circle" \
  --prompt "an image of a green star" --prompt "a rendering of an orange triangle" --prompt "there is a purple ring" \
  --out docs/shapes-circle.png
