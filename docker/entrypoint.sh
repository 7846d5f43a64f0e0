#!/bin/sh
# Container entrypoint: choose the artifacts folder, then exec the command (default: satml-serve).
#
# Models baked into the image live in $SATML_BAKED_ARTIFACTS_DIR (/app/artifacts). Extra or
# replacement models can be mounted at $SATML_EXTRA_ARTIFACTS_DIR (/app/artifacts-extra), one
# folder per model. When that mount holds any model folder, the two are merged into one folder of
# symlinks under $TMPDIR or /tmp (an extra model replaces a baked one of the same name) and the server reads
# that. Setting SATML_ARTIFACTS_DIR yourself skips all of this.
set -eu

baked=${SATML_BAKED_ARTIFACTS_DIR:-/app/artifacts}
extra=${SATML_EXTRA_ARTIFACTS_DIR:-/app/artifacts-extra}

if [ -z "${SATML_ARTIFACTS_DIR:-}" ]; then
    if [ -d "$extra" ] && [ -n "$(find "$extra" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n 1)" ]; then
        merged=$(mktemp -d "${TMPDIR:-/tmp}/satml-artifacts.XXXXXX")
        for dir in "$baked"/* "$extra"/*; do
            [ -d "$dir" ] || continue
            name=$(basename "$dir")
            rm -f "$merged/$name"
            ln -s "$dir" "$merged/$name"
        done
        echo "entrypoint: artifacts = $baked + $extra -> $merged: $(ls "$merged" | tr '\n' ' ')" >&2
        SATML_ARTIFACTS_DIR=$merged
    else
        SATML_ARTIFACTS_DIR=$baked
    fi
    export SATML_ARTIFACTS_DIR
fi

exec "$@"
