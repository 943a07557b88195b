#!/usr/bin/env bash
# Usage: scripts/ensure-helm.sh VERSION DIR
#
# Make DIR/bin/helm exist and report VERSION, building it from source with
# `go install`: the Go module proxy and checksum database vouch for the
# source, so there is no release tarball to verify. A second run is a no-op;
# a rebuild of the same version on a machine that built it before is fast
# because Go's module and build caches stay in their default places
# (~/go/pkg/mod, ~/.cache/go-build).
#
# Works unattended (CI=true, root, no tty). Go is taken from PATH, else
# /usr/local/go/bin/go, else Debian's golang-go; a Go older than Helm's
# go.mod asks for gets the right toolchain from the Go module proxy.
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 VERSION DIR   (e.g. $0 v3.22.0 \$PWD/.tools)" >&2
    exit 64
fi
VERSION=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
HELM="$DIR/bin/helm"
MODULE=helm.sh/helm/v3

log() { echo "ensure-helm: $*" >&2; }

installed_version() {
    [ -x "$HELM" ] && "$HELM" version --template '{{.Version}}' 2>/dev/null || true
}

if [ "$(installed_version)" = "$VERSION" ]; then
    exit 0
fi

# Go needs a home for its caches; some CI runners start without $HOME.
if [ -z "${HOME:-}" ]; then
    HOME=$(getent passwd "$(id -u)" | cut -d: -f6)
    export HOME
fi

find_go() {
    if command -v go >/dev/null 2>&1; then
        command -v go
    elif [ -x /usr/local/go/bin/go ]; then
        echo /usr/local/go/bin/go
    fi
}

GO=$(find_go)
if [ -z "$GO" ]; then
    log "no Go toolchain found; installing Debian's golang-go"
    "$(dirname "$0")/apt-install.sh" golang-go
    GO=$(find_go)
    [ -n "$GO" ] || { log "golang-go installed but no go binary found"; exit 1; }
fi

# The Go release Helm's go.mod requires (its toolchain line if any, else its go line).
# Run Go from DIR: outside any go.mod, so module queries mean the published module.
mkdir -p "$DIR/bin"
cd "$DIR"
# An old Go reports "requires go >= ..." as an error but still fetches go.mod.
info=$("$GO" mod download -json "$MODULE@$VERSION" || true)
gomod=$(printf '%s\n' "$info" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[ -f "$gomod" ] || { log "could not fetch $MODULE@$VERSION's go.mod: $info"; exit 1; }
need=$(sed -n 's/^toolchain go\([0-9][0-9.a-z]*\)$/\1/p' "$gomod")
[ -n "$need" ] || need=$(sed -n 's/^go \([0-9][0-9.]*\)$/\1/p' "$gomod")
# Since Go 1.21 a release's first version carries ".0" (go1.21.0, not go1.21).
case "$need" in
    1.[0-9]|1.1[0-9]|1.20|*.*.*|*rc*|*beta*) ;;
    *) need="$need.0" ;;
esac

have=$("$GO" env GOVERSION | sed 's/^go//')
older() { # is $1 an older Go version than $2?
    [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$1" ]
}
if older "$have" "$need"; then
    major_minor=$(echo "$have" | cut -d. -f1-2)
    if older "$major_minor" "1.21"; then
        # No automatic toolchain switching before Go 1.21 (Debian bookworm's
        # golang-go is 1.19): fetch the release the way newer Go does, as the
        # golang.org/toolchain module from the module proxy. Module zips carry
        # no file modes, so copy it out and make its programs executable.
        root="$DIR/go-toolchain/go$need"
        if [ ! -x "$root/bin/go" ]; then
            log "go$have is too old for Helm $VERSION; fetching go$need from the Go module proxy"
            toolchain="golang.org/toolchain@v0.0.1-go$need.$("$GO" env GOOS)-$("$GO" env GOARCH)"
            src=$("$GO" mod download -json "$toolchain" |
                sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
            [ -d "$src" ] || { log "could not download $toolchain"; exit 1; }
            rm -rf "$root.tmp" && mkdir -p "$(dirname "$root")"
            cp -R "$src" "$root.tmp"
            chmod -R u+w "$root.tmp"
            chmod +x "$root.tmp"/bin/* "$root.tmp"/pkg/tool/*/*
            rm -rf "$root" && mv "$root.tmp" "$root"
        fi
        GO="$root/bin/go"
    else
        # Go 1.21+ fetches a newer toolchain from the module proxy itself, but
        # only if asked: Debian's go.env says GOTOOLCHAIN=local.
        export GOTOOLCHAIN="go$need"
    fi
fi

# Stamp the version like Helm's own Makefile does, so `helm version` reports
# VERSION (a plain `go install` says "v3.22") and the default Kubernetes
# version `helm template` assumes matches the client-go Helm was built with.
client_go=$(sed -n 's/^[[:space:]]*k8s\.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$gomod" | head -n1)
ldflags="-w -s -X $MODULE/internal/version.version=$VERSION"
if [ -n "$client_go" ]; then
    for pkg in pkg/lint/rules pkg/chartutil; do
        ldflags="$ldflags -X $MODULE/$pkg.k8sVersionMajor=1 -X $MODULE/$pkg.k8sVersionMinor=$client_go"
    done
fi

log "building helm $VERSION into $DIR/bin with $("$GO" version)"
GOBIN="$DIR/bin" CGO_ENABLED=0 "$GO" install -ldflags "$ldflags" "$MODULE/cmd/helm@$VERSION"

got=$(installed_version)
if [ "$got" != "$VERSION" ]; then
    log "built $HELM but it reports '$got', not '$VERSION'"
    exit 1
fi
log "helm $VERSION ready at $HELM"
