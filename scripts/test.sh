#!/usr/bin/env bash
# The whole suite: build, typecheck, then every tap test. Ends with a plain
# "N passed, N failed" line because that is what CI reads; tap's own summary is not.
set -uo pipefail
cd "$(dirname "$0")/.."

npm run --silent build || { echo "0 passed, 1 failed"; exit 1; }
npm run --silent typecheck || { echo "0 passed, 1 failed"; exit 1; }

shopt -s globstar nullglob
files=("$@")
if [ ${#files[@]} -eq 0 ]; then files=(test/**/*.test.ts); fi

out=$(mktemp)
npx tap --reporter=tap --timeout=900 \
  --statements=70 --branches=60 --functions=70 --lines=70 \
  "${files[@]}" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}

node -e '
const text = require("fs").readFileSync(process.argv[1], "utf8");
const m = [...text.matchAll(/^# (\{ total: .*\})$/gm)].pop();
let pass = 0, fail = 0, skip = 0;
if (m) {
  const get = (k) => Number((new RegExp(k + ": (\\d+)").exec(m[1]) || [0, 0])[1]);
  pass = get("pass"); fail = get("fail"); skip = get("skip") + get("todo");
}
if (!m || (process.argv[2] !== "0" && fail === 0)) fail += 1; // a crash or coverage gate counts as a failure
console.log(`${pass} passed, ${fail} failed` + (skip ? `, ${skip} skipped` : ""));
' "$out" "$rc"
rm -f "$out"
exit "$rc"
