#!/usr/bin/env bash
# deploy/observability: the Prometheus rules pass `promtool check rules` and their unit tests
# (`promtool test rules`, one or more per alert), and the Grafana dashboard and the rules only
# use metric names the services export (libs/medgemma-rpc/src/metrics.rs) or the rules record.
# promtool comes from Debian's `prometheus` package (installed when missing). ~5 s.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
  DEBIAN_FRONTEND=noninteractive $apt_get install -y -q --no-install-recommends prometheus >/dev/null
fi
dir=deploy/observability
promtool check rules "$dir/rules.yml"
(cd "$dir" && promtool test rules rules-test.yml)
python3 - "$dir" <<'PY'
import json, pathlib, re, sys
d = pathlib.Path(sys.argv[1])
exported = set(re.findall(r'pub const \w+: &str = "(medgemma:[a-z0-9_]+)"',
                          pathlib.Path("libs/medgemma-rpc/src/metrics.rs").read_text()))
rules = (d / "rules.yml").read_text()
recorded = set(re.findall(r"record: (medgemma:[a-z0-9_:]+)", rules))
dash = json.loads((d / "grafana-dashboard.json").read_text())
exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
bad = []
for where, text in [("dashboard", "\n".join(exprs)), ("rules", rules)]:
    for name in set(re.findall(r"medgemma:[a-z0-9_:]+", text)):
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if base not in exported and name not in recorded:
            bad.append(f"{where}: {name}")
if bad:
    sys.exit("unknown metric names:\n  " + "\n  ".join(sorted(bad)))
print(f"dashboard: {len(dash['panels'])} panels, {len(exprs)} queries; "
      f"{len(exported)} exported metrics, {len(recorded)} recording rules")
PY
