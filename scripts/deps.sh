# Shared by scripts/demo and scripts/test: makes sure the Debian packages Thaw's build needs are
# installed. libclang-dev: bindgen for the userfaultfd crate; libc6-dev: the static libc of the
# Linux test guest's /init. apt itself fetches Debian's cloud kernel when a test needs it.
thaw_ensure_deps() {
    local missing=()
    for pkg in libclang-dev libc6-dev; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing Debian packages: ${missing[*]}; install them with:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        return 1
    fi
    echo "installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
