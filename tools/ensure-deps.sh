#!/bin/sh
# Checks that the Debian packages named as arguments are installed. As root,
# installs the missing ones with apt-get; otherwise names them and fails.
missing=""
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ]; then
    echo "installing missing Debian packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq $missing >&2 && exit 0
    echo "apt-get failed to install:$missing" >&2
    exit 1
fi
echo "missing Debian packages:$missing" >&2
echo "install them with: sudo apt-get install$missing" >&2
exit 1
