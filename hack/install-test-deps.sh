#!/usr/bin/env bash
# Installs the external programs the integration tests run for real:
#   * prometheus (Debian package) for the metrics tests;
#   * etcd, kube-apiserver and kubectl for tests/integration/k8s_env.py;
#   * KubeRay's RayCluster CRD (the published YAML, for the dry-run of deploy/ray/kuberay/).
#
# Debian ships no kube-apiserver, and its etcd-server (3.4.23) is older than
# the minimum documented for Kubernetes 1.31+ (etcd 3.4.29 / 3.5.11), so all
# three are compiled from the Go module proxy using the pinned module
# in hack/kube-build/ (its go.mod holds the Kubernetes version). The binaries
# go to a cache outside the repository:
#     ${AIFACTORY_CACHE:-$HOME/.cache/aifactory}/k8s/<version>/bin/
# and are rebuilt only when missing or when hack/kube-build/ changed.
# If KUBEBUILDER_ASSETS names a directory holding etcd, kube-apiserver and
# kubectl (e.g. from setup-envtest), those are used and nothing is built.
# The RayCluster CRD comes from the Go module proxy too (the ray-operator module at the
# version in hack/kuberay.version holds config/crd/bases/ray.io_rayclusters.yaml), copied to
#     ${AIFACTORY_CACHE:-$HOME/.cache/aifactory}/kuberay/<version>/ray.io_rayclusters.yaml
# once; without Go or the proxy it is skipped with a warning (only that test needs it).
#
# Idempotent; needs only Go >= 1.25 (or GOTOOLCHAIN=auto) and apt.
# The binaries directory is printed as the last line on stdout, so
#     export KUBEBUILDER_ASSETS="$(hack/install-test-deps.sh)"
# works; progress goes to stderr.
#
# Environment:
#   AIFACTORY_CACHE      cache root (default $HOME/.cache/aifactory)
#   AIFACTORY_SKIP_APT=1 do not install Debian packages
#   KUBEBUILDER_ASSETS   prebuilt etcd/kube-apiserver/kubectl to use instead
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KUBE_BUILD_DIR="${REPO_ROOT}/hack/kube-build"
BINARIES=(etcd kube-apiserver kubectl)
APT_PACKAGES=(prometheus)

log() { echo "install-test-deps: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

kube_version() {
  local version
  version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v[0-9]/ { print $2; exit }' \
    "${KUBE_BUILD_DIR}/go.mod")"
  [[ -n "${version}" ]] || die "no k8s.io/kubernetes requirement in ${KUBE_BUILD_DIR}/go.mod"
  echo "${version}"
}

has_binaries() {  # has_binaries DIR -> 0 if every binary is an executable file there
  local dir="$1" name
  for name in "${BINARIES[@]}"; do
    [[ -x "${dir}/${name}" && -f "${dir}/${name}" ]] || return 1
  done
}

as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

install_apt_packages() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    command -v "${pkg}" >/dev/null || missing+=("${pkg}")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "apt packages present: ${APT_PACKAGES[*]}"
    return
  fi
  if [[ "${AIFACTORY_SKIP_APT:-}" == 1 ]]; then
    log "AIFACTORY_SKIP_APT=1: not installing ${missing[*]}"
    return
  fi
  log "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

find_go() {
  if command -v go >/dev/null; then command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then echo /usr/local/go/bin/go
  else die "Go not found: install Go >= 1.25 (https://go.dev/dl/) and put it on PATH"
  fi
}

build_inputs_hash() {  # changes whenever the build definition changes
  (cd "${KUBE_BUILD_DIR}" && cat go.mod go.sum etcd/main.go) | sha256sum | cut -d' ' -f1
}

version_ldflags() {  # what `kubectl version` / the apiserver's /version report
  local version="$1" minor pkg flags=""
  minor="$(echo "${version}" | cut -d. -f2)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=1"
    flags+=" -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
  done
  echo "${flags}"
}

build_binaries() {  # build_binaries VERSION BIN_DIR STAMP_FILE
  local version="$1" bin_dir="$2" stamp="$3" go_bin staging start
  go_bin="$(find_go)"
  staging="$(mktemp -d "${bin_dir%/bin}/bin.tmp.XXXXXX")"
  # We run inside $(...), a subshell with its own EXIT trap: drop partial output.
  # shellcheck disable=SC2064  # expand now: $staging is local to this function
  trap "rm -rf '${staging}'" EXIT
  log "building ${BINARIES[*]} for Kubernetes ${version} with $("${go_bin}" version)"
  log "(a cold build takes about 4 minutes on 2 cores and ~2.5 GB of GOCACHE)"
  start=$SECONDS
  (
    cd "${KUBE_BUILD_DIR}"
    CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false -mod=readonly" \
      "${go_bin}" build -ldflags="-s -w $(version_ldflags "${version}")" -o "${staging}/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl ./etcd
  ) >&2
  has_binaries "${staging}" || die "go build did not produce ${BINARIES[*]}"
  mkdir -p "${bin_dir}"
  local name
  for name in "${BINARIES[@]}"; do mv -f "${staging}/${name}" "${bin_dir}/${name}"; done
  rm -rf "${staging}"
  build_inputs_hash > "${stamp}"
  log "built in $((SECONDS - start)) s"
}

ensure_kube_binaries() {  # prints the directory holding the binaries
  if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    if has_binaries "${KUBEBUILDER_ASSETS}"; then
      log "using KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS}; building nothing"
      echo "${KUBEBUILDER_ASSETS}"
      return
    fi
    log "KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS} lacks one of ${BINARIES[*]}; ignoring it"
  fi
  local version version_dir bin_dir stamp
  version="$(kube_version)"
  version_dir="${AIFACTORY_CACHE:-${HOME}/.cache/aifactory}/k8s/${version}"
  bin_dir="${version_dir}/bin"
  stamp="${version_dir}/build-inputs.sha256"
  mkdir -p "${version_dir}"
  # Serialise concurrent runs (parallel CI jobs sharing a cache).
  exec 9>"${version_dir}/.lock"
  flock 9 2>/dev/null || true
  if has_binaries "${bin_dir}" && [[ "$(cat "${stamp}" 2>/dev/null)" == "$(build_inputs_hash)" ]]; then
    log "Kubernetes ${version} binaries already built"
  else
    build_binaries "${version}" "${bin_dir}" "${stamp}"
  fi
  exec 9>&-
  echo "${bin_dir}"
}

ensure_kuberay_crd() {  # the RayCluster CRD at the pinned KubeRay version, in the cache
  local version dir target go_bin module_dir
  version="$(tr -d '[:space:]' < "${REPO_ROOT}/hack/kuberay.version")"
  dir="${AIFACTORY_CACHE:-${HOME}/.cache/aifactory}/kuberay/${version}"
  target="${dir}/ray.io_rayclusters.yaml"
  if [[ -s "${target}" ]]; then
    log "KubeRay ${version} RayCluster CRD already fetched"
    return
  fi
  if ! go_bin="$(find_go 2>/dev/null)"; then
    log "WARNING: no Go: not fetching the KubeRay RayCluster CRD (its dry-run test will skip)"
    return
  fi
  module_dir="$(cd "${REPO_ROOT}" && GOFLAGS=-mod=mod "${go_bin}" mod download -json \
    "github.com/ray-project/kuberay/ray-operator@${version}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')" || module_dir=""
  if [[ -z "${module_dir}" || ! -s "${module_dir}/config/crd/bases/ray.io_rayclusters.yaml" ]]; then
    log "WARNING: could not fetch github.com/ray-project/kuberay/ray-operator@${version}" \
      "from the Go module proxy (its dry-run test will skip)"
    return
  fi
  mkdir -p "${dir}"
  cp "${module_dir}/config/crd/bases/ray.io_rayclusters.yaml" "${target}.tmp"
  chmod u+w "${target}.tmp"
  mv -f "${target}.tmp" "${target}"
  log "KubeRay ${version} RayCluster CRD in ${target}"
}

main() {
  install_apt_packages
  local bin_dir
  bin_dir="$(ensure_kube_binaries)"
  ensure_kuberay_crd
  log "etcd, kube-apiserver and kubectl are in ${bin_dir}"
  echo "${bin_dir}"
}

main "$@"
