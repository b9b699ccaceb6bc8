#!/bin/sh
# Downloads Karpathy's stories260K (llama2.c checkpoint and tokenizer) from the
# Hugging Face hub, checks the checkpoint's sha256, converts it with
# `cpeft convert-llama2c` and moves the folder to OUT_DIR in one rename. Does
# nothing when OUT_DIR/config.json exists. Offline, it prints what to fetch by
# hand and exits 2. A failed run leaves no files behind (parent folders stay).
# Usage: tools/fetch-stories260K.sh OUT_DIR   (after `make`)
# Environment: CPEFT_HUB_URL, the hub's base URL (default https://huggingface.co);
#              CPEFT_BIN, the cpeft binary (default: cpeft at the repository root).
set -eu

me=fetch-stories260K
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out=$1
while [ "$out" != "${out%/}" ] && [ "$out" != / ]; do out=${out%/}; done
[ -f "$out/config.json" ] && exit 0

hub=${CPEFT_HUB_URL:-https://huggingface.co}
base="${hub%/}/karpathy/tinyllamas/resolve/main/stories260K"
bin_sha256=b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696
tools=$(dirname "$0")
cpeft=${CPEFT_BIN:-$tools/../cpeft}

# Prints how to install the model by hand, then exits 2.
offline_help() {
    cat >&2 <<EOF
$me: download these two files on a machine with network access:
  $base/stories260K.bin  (sha256 $bin_sha256)
  $base/tok512.model
$me: then place the model by running, in this repository:
  ./cpeft convert-llama2c --checkpoint stories260K.bin --tokenizer tok512.model --out $out
$me: or run 'make demo SHARED=DIR' with a DIR/models/stories260K folder that already holds the converted model
EOF
    exit 2
}

if ! command -v curl >/dev/null 2>&1; then
    # As root this installs Debian's curl; otherwise it names the package.
    sh "$tools/ensure-deps.sh" curl || offline_help
fi
if ! command -v sha256sum >/dev/null 2>&1; then
    echo "$me: sha256sum not found; install Debian's coreutils package" >&2
    exit 1
fi
if [ ! -x "$cpeft" ]; then
    echo "$me: $cpeft not found or not executable; run 'make' first" >&2
    exit 1
fi
if [ -e "$out" ] && ! rmdir "$out" 2>/dev/null; then
    echo "$me: $out exists without config.json; remove it or choose another OUT_DIR" >&2
    exit 1
fi

# The work folder sits beside OUT_DIR so that the final mv is a rename.
mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$out.fetch-XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

for name in stories260K.bin tok512.model; do
    echo "$me: downloading $base/$name" >&2
    if ! curl --fail --location --silent --show-error --connect-timeout 20 \
            --output "$work/$name" "$base/$name"; then
        echo "$me: cannot download $base/$name" >&2
        offline_help
    fi
done

found=$(sha256sum "$work/stories260K.bin" | cut -d ' ' -f 1)
if [ "$found" != "$bin_sha256" ]; then
    echo "$me: $base/stories260K.bin has sha256 $found, expected $bin_sha256;" \
         "the download is corrupt or the file changed on the hub, so nothing was installed" >&2
    exit 1
fi

"$cpeft" convert-llama2c --checkpoint "$work/stories260K.bin" \
    --tokenizer "$work/tok512.model" --out "$work/model" >/dev/null
# Keep the original checkpoint in llama2c/, where the conversion tests look for it.
mkdir "$work/model/llama2c"
mv "$work/stories260K.bin" "$work/model/llama2c/stories260K.bin"
mv "$work/model" "$out"
echo "$me: installed stories260K in $out" >&2
