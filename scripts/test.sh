#!/usr/bin/env bash
# The whole suite: build, typecheck, lint, then every tap test. Ends with a plain
# "N passed, N failed" line because that is what CI reads; tap's own summary is not.
set -uo pipefail
cd "$(dirname "$0")/.."

npm run --silent build || { echo "0 passed, 1 failed"; exit 1; }
npm run --silent typecheck || { echo "0 passed, 1 failed"; exit 1; }
npm run --silent lint || { echo "0 passed, 1 failed"; exit 1; }

shopt -s globstar nullglob
files=("$@")
if [ ${#files[@]} -eq 0 ]; then files=(test/**/*.test.ts); fi

out=$(mktemp)
npx tap --reporter=tap --timeout=900 \
  --statements=85 --branches=80 --functions=85 --lines=85 \
  "${files[@]}" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
# Each run's tap output and exit code, for the closing line.
runs=("$out" "$rc")

# The benchmark's end-to-end check runs alone, after the suite: it loads both cores
# for a minute and a half, which would skew the suite's timing-sensitive tests. It
# runs only shell and fio, so it has no coverage of its own to gate.
if [ $# -eq 0 ]; then
  bench_out=$(mktemp)
  npx tap --reporter=tap --timeout=900 --disable-coverage test/bench/*.bench.ts 2>&1 | tee "$bench_out"
  brc=${PIPESTATUS[0]}
  runs+=("$bench_out" "$brc")
  [ "$rc" -eq 0 ] && rc=$brc
fi

node -e '
const fs = require("fs");
let pass = 0, fail = 0, skip = 0;
for (let i = 1; i < process.argv.length; i += 2) {
  const m = [...fs.readFileSync(process.argv[i], "utf8").matchAll(/^# (\{ total: .*\})$/gm)].pop();
  let f = 0;
  if (m) {
    const get = (k) => Number((new RegExp(k + ": (\\d+)").exec(m[1]) || [0, 0])[1]);
    pass += get("pass"); f = get("fail"); skip += get("skip") + get("todo");
  }
  if (!m || (process.argv[i + 1] !== "0" && f === 0)) f += 1; // a crash or coverage gate counts as a failure
  fail += f;
}
console.log(`${pass} passed, ${fail} failed` + (skip ? `, ${skip} skipped` : ""));
' "${runs[@]}"
rm -f "$out" ${bench_out:+"$bench_out"}
exit "$rc"
