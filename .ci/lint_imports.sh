#!/usr/bin/env bash
# The import-linter contracts of pyproject.toml over w2w as it installs. launch/ and analysis/ sit at
# the top of the repository but install as w2w.launch and w2w.analysis, a mapping grimp does not
# follow: lay the package out as installed in a scratch folder and check that.
# Usage: .ci/lint_imports.sh [REPO]   (REPO: default this checkout; LINT_IMPORTS: the lint-imports to run)
set -euo pipefail
repo="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
lint="$(realpath "${LINT_IMPORTS:-$(command -v lint-imports)}")"
view="$(mktemp -d)"
trap 'rm -rf "$view"' EXIT
cp -r "$repo/w2w" "$view/w2w"
cp -r "$repo/launch" "$view/w2w/launch"
cp -r "$repo/analysis" "$view/w2w/analysis"
cd "$view"
PYTHONPATH="$view" "$lint" --no-cache --no-logo "$repo/pyproject.toml"
