# Shared by scripts/demo and scripts/test: makes sure what Thaw's build and tests need is
# installed. Debian packages: libclang-dev (bindgen for the userfaultfd crate) and libc6-dev
# (static libc for thaw-init and the Linux test guest's /init); apt itself fetches Debian's cloud
# kernel when a test needs it. PyPI: AWS's Lambda runtime clients, which thaw-init's Runtime API
# is tested against, and boto3, the AWS SDK that thawd's Invoke API is tested with.
# The awslambdaric and snapshot-restore-py pins mirror RUNTIME_PACKAGES in
# src/function_image/pip.rs (what `thaw function build` puts in every image; a unit test there
# checks this line): change both together.
THAW_PIP_PACKAGES="awslambdaric==4.2.2 snapshot-restore-py==1.0.0 boto3==1.43.11"

thaw_ensure_python_deps() {
    python3 -c "import awslambdaric, snapshot_restore_py, boto3" 2>/dev/null && return 0
    echo "installing $THAW_PIP_PACKAGES from PyPI" >&2
    # shellcheck disable=SC2086 # the list is meant to split into arguments
    python3 -m pip install --quiet $THAW_PIP_PACKAGES
}

# The S3 servers the snapshot store's tests run against (store/tests/s3_servers.rs): two
# independent implementations, s3s-fs (Rust, built once into Thaw's cache, keyed by its version)
# and moto's server (Python, from PyPI).
THAW_S3S_FS_VERSION="0.14.1"
THAW_MOTO_PACKAGE="moto[server]==5.2.6"

thaw_ensure_s3_servers() {
    local cache="${THAW_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/thaw}"
    local root="$cache/s3s-fs-$THAW_S3S_FS_VERSION"
    if [ ! -x "$root/bin/s3s-fs" ]; then
        echo "building s3s-fs $THAW_S3S_FS_VERSION into $root" >&2
        cargo install --quiet --locked s3s-fs --version "$THAW_S3S_FS_VERSION" \
            --features binary --root "$root"
    fi
    export THAW_S3S_FS="$root/bin/s3s-fs"
    if ! command -v moto_server >/dev/null 2>&1; then
        echo "installing $THAW_MOTO_PACKAGE from PyPI" >&2
        python3 -m pip install --quiet "$THAW_MOTO_PACKAGE"
    fi
    THAW_MOTO_SERVER="$(command -v moto_server)"
    export THAW_MOTO_SERVER
}

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
