#!/usr/bin/env bash
# Checks the Bazel graph in BUILD: `bazel build //...` with Debian's bazel-bootstrap (Bazel 4, native
# Python rules), offline. Runs on a copy of the tracked files plus an empty WORKSPACE (kept out of the
# repo's top level).
#
# Bazel 4's own toolchain setup fetches rules_cc, rules_java and remote_coverage_tools from the web,
# which this machine cannot reach (Debian's packaged rules_cc is too new for Bazel 4). Three local
# stand-ins replace them: the first two forward their macros to Bazel's native C++/Java rules, the
# third provides the coverage target py_test declares (coverage runs are not supported offline).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bazel >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bazel-bootstrap) \
      >/dev/null
  else
    echo "bazel_check: no bazel and no way to apt-get install bazel-bootstrap; skipped" >&2
    exit 0
  fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/src/"
touch "$work/src/WORKSPACE"

forwarding_repo() {  # forwarding_repo DIR PACKAGE RULE...: a defs.bzl calling native.RULE
  local dir=$1 pkg=$2; shift 2
  mkdir -p "$dir/$pkg"
  touch "$dir/WORKSPACE" "$dir/BUILD" "$dir/$pkg/BUILD"
  for rule in "$@"; do printf 'def %s(**kwargs):\n    native.%s(**kwargs)\n\n' "$rule" "$rule"; done \
    > "$dir/$pkg/defs.bzl"
}
forwarding_repo "$work/rules_cc" cc cc_library cc_binary cc_test cc_import cc_proto_library \
  cc_toolchain cc_toolchain_suite fdo_prefetch_hints fdo_profile objc_library objc_import
forwarding_repo "$work/rules_java" java java_binary java_import java_library java_test \
  java_lite_proto_library java_proto_library java_package_configuration java_plugin java_runtime \
  java_toolchain
mkdir -p "$work/coverage_tools"
touch "$work/coverage_tools/WORKSPACE"
printf '#!/bin/sh\necho "coverage is not available offline" >&2\nexit 1\n' > "$work/coverage_tools/gen.sh"
chmod +x "$work/coverage_tools/gen.sh"
printf 'sh_binary(name = "coverage_report_generator", srcs = ["gen.sh"], %s)\n' \
  'visibility = ["//visibility:public"]' > "$work/coverage_tools/BUILD"

cd "$work/src"
bazel --output_user_root="$work/root" --batch build --noshow_progress \
  --override_repository=rules_cc="$work/rules_cc" \
  --override_repository=rules_java="$work/rules_java" \
  --override_repository=remote_coverage_tools="$work/coverage_tools" //... > "$work/log" 2>&1 || {
  cat "$work/log" >&2
  echo "bazel_check: bazel build //... FAILED" >&2
  exit 1
}
echo "bazel_check: bazel build //... passed ($(grep -c . "$work/log") log lines)"
