# Sourced by the bench/device_*.sh scripts: the environment of a run on the lent machine and its time-boxed steps.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 KRASIS_HOME=/tmp/krasis-home
OUT="${OUT:-/tmp/krasis-out}"
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: runs when NAME is in $STEPS, output in $OUT/NAME.txt, status in summary.txt
  local name=$1 seconds=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: rc=$? in $((SECONDS - start)) s" >> "$OUT/summary.txt"
}
