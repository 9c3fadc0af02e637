# Sourced by the GPU session scripts.
# `run_folder <gguf> <run>` sets $gguf, $run (made if missing), $log (<run>/session.log) and
# $work (<run>/work).
# `step <name> <command...>` runs one resumable step of the run folder: its output goes to
# $run/<name>.log, a line per start and end to $log, and $run/<name>.done marks it finished (a
# rerun skips it).
step() {
  local name=$1
  shift
  if [ -f "$run/$name.done" ]; then echo "$(date +%T) $name: done before" >> "$log"; return 0; fi
  echo "$(date +%T) $name: start" >> "$log"
  "$@" > "$run/$name.log" 2>&1
  local rc=$?
  echo "$(date +%T) $name: exit $rc" >> "$log"
  [ $rc -eq 0 ] && touch "$run/$name.done"
  return $rc
}

run_folder() {
  gguf=$1
  run=$2
  mkdir -p "$run"
  log=$run/session.log
  work=$run/work
}
