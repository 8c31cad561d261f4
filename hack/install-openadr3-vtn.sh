#!/usr/bin/env bash
# Builds the OpenADR 3 VTN that tests/integration/test_operator_openadr3.py runs on loopback:
# the `openadr` crate (OpenADR 3.1 VTN, VEN runtime and client in Rust; Apache-2.0 OR MIT)
# from crates.io, with in-memory storage and its own OAuth2 token endpoint (features `vtn`,
# `internal-auth`): one binary, no database. Pinned by OPENADR_VTN_VERSION and built with
# the crate's own Cargo.lock (--locked). The binary goes to a cache outside the repository:
#     ${AIFACTORY_CACHE:-$HOME/.cache/aifactory}/openadr3-vtn/<version>/bin/openadr
# (also linked as .../openadr3-vtn/current) and is built only when missing.
#
# The crate declares rust-version 1.96; it builds with 1.95 (--ignore-rust-version), the
# toolchain of this project's machines. Release profile without LTO, 16 codegen units: a
# cold build (crates already downloaded) took 2 m 48 s of CPU here, 8 min of wall time on a
# 2-core machine shared with other builds (load 12-26); cached, the script takes 0.4 s.
#
# usage: hack/install-openadr3-vtn.sh   prints the binary's path as the last line on stdout;
#                                       progress goes to stderr
# Environment:
#   AIFACTORY_CACHE        cache root (default $HOME/.cache/aifactory)
#   AIFACTORY_OPENADR3_VTN a prebuilt `openadr` binary to use instead (nothing is built)
set -euo pipefail

VERSION=${OPENADR_VTN_VERSION:-0.4.0}
FEATURES=vtn,internal-auth
CACHE=${AIFACTORY_CACHE:-$HOME/.cache/aifactory}
ROOT="$CACHE/openadr3-vtn/$VERSION"

log() { echo "install-openadr3-vtn: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ -n "${AIFACTORY_OPENADR3_VTN:-}" ]]; then
  [[ -x "$AIFACTORY_OPENADR3_VTN" ]] || die "AIFACTORY_OPENADR3_VTN=$AIFACTORY_OPENADR3_VTN is not an executable"
  log "using AIFACTORY_OPENADR3_VTN=$AIFACTORY_OPENADR3_VTN; building nothing"
  echo "$AIFACTORY_OPENADR3_VTN"
  exit 0
fi

mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"  # serialise concurrent runs sharing a cache
flock 9 2>/dev/null || true
if [[ -x "$ROOT/bin/openadr" ]] && "$ROOT/bin/openadr" version >/dev/null 2>&1; then
  log "openadr $VERSION already built"
else
  CARGO=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
  [[ -x "$CARGO" ]] || die "cargo not found: install Rust (rustup) to build the OpenADR 3 VTN"
  log "building the openadr $VERSION VTN with $("$CARGO" --version) (a few minutes, once)"
  start=$SECONDS
  rm -rf "$ROOT.partial"
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    "$CARGO" install "openadr@$VERSION" --locked --features "$FEATURES" \
    --ignore-rust-version --root "$ROOT.partial" --target-dir "$CACHE/openadr3-vtn/target" \
    --quiet >&2
  "$ROOT.partial/bin/openadr" version >/dev/null || die "the built openadr does not run"
  rm -rf "$ROOT/bin"
  mv "$ROOT.partial/bin" "$ROOT/bin"
  rm -rf "$ROOT.partial" "$CACHE/openadr3-vtn/target"  # ~1 GB of build output
  log "built in $((SECONDS - start)) s"
fi
exec 9>&-
ln -sfn "$ROOT" "$CACHE/openadr3-vtn/current"
echo "$ROOT/bin/openadr"
