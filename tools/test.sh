#!/usr/bin/env bash
# The project's test command (`make test`; .ci/run runs exactly that):
#   1. hygiene: nbdev_clean + nbdev_export + README regeneration must not change the tree;
#   2. nbdev_test: every notebook in nbs/, cells flagged `slow`/`cuda` skipped (TEST_FLAGS="slow" runs them);
#   3. pytest: integration tests under tests/.
# Ends with one summary line "tests: N passed, N failed[, N skipped]".
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
failed=0; passed=0; skipped=0
log=$(mktemp -d)

snapshot() { { git status --porcelain --untracked-files=all; git diff; } | sha256sum; }
echo "== hygiene: nbdev_clean, nbdev_export, README =="
before=$(snapshot)
nbdev_clean >/dev/null 2>&1 && nbdev_export >/dev/null 2>&1 && python tools/build_docs.py --readme-only >/dev/null
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "FAILED: notebooks and library out of sync (nbdev_clean/nbdev_export/README changed files):"
  git status --short | head -20
  failed=$((failed+1))
else
  echo "ok: notebooks, library and README in sync"; passed=$((passed+1))
fi

echo "== nbdev_test (flags: ${TEST_FLAGS:-none}) =="
nbs=$(ls nbs/[0-9]*.ipynb nbs/index.ipynb 2>/dev/null | wc -l)
start=$SECONDS
nbdev_test --n_workers "${NB_WORKERS:-2}" --timing ${TEST_FLAGS:+--flags "$TEST_FLAGS"} 2>&1 | tee "$log/nbdev.txt"
nb_failed=$(grep -cE '^\s+\S+\.ipynb$' "$log/nbdev.txt" || true)
if [ "${PIPESTATUS[0]}" -ne 0 ] && [ "$nb_failed" -eq 0 ]; then nb_failed=1; fi
echo "nbdev_test: $((nbs-nb_failed)) notebooks passed, $nb_failed failed in $((SECONDS-start)) s"
passed=$((passed+nbs-nb_failed)); failed=$((failed+nb_failed))

echo "== pytest tests/ =="
python -m pytest tests -q -p no:cacheprovider --junitxml="$log/junit.xml" ${PYTEST_ARGS:-}
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then [ -f "$log/junit.xml" ] || failed=$((failed+1)); fi
if [ -f "$log/junit.xml" ]; then
  read -r t f e s < <(python - "$log/junit.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot(); s = r if r.tag == 'testsuite' else r.find('testsuite')
print(s.get('tests'), s.get('failures'), s.get('errors'), s.get('skipped'))
PY
)
  passed=$((passed+t-f-e-s)); failed=$((failed+f+e)); skipped=$((skipped+s))
fi
echo
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
