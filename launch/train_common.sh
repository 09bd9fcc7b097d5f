# Shared by launch/train_*.sh (sourced, not run): usage, shell quoting and the checks both make.

# The calling script's header comment (its usage), the error, exit 2.
usage() {
  sed -n '2,/^[^#]/p' "$0" | sed -n 's/^# \{0,1\}//p' >&2
  echo "error: $1" >&2
  exit 2
}

# A word as the shell reads it back: bare when safe, else single-quoted.
quote() {
  local word=$1
  if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out=() word
  for word in "$@"; do out+=("$(quote "$word")"); done
  printf '%s' "${out[*]}"
}

# --config names an existing config file; every --env is KEY=VALUE.
check_config_and_envs() {
  local config=$1 pair
  shift
  [ -n "$config" ] || usage "--config (e.g. configs/stages.py:trace) is required"
  [ -f "${config%%:*}" ] || usage "--config: no file ${config%%:*}"
  for pair in "$@"; do
    [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage "--env=$pair: expected KEY=VALUE"
  done
}

# The jax version requirements.lock pins (accelerator runtimes are installed at it).
locked_jax_version() {
  local version
  version=$(sed -n 's/^jax==//p' requirements.lock)
  [ -n "$version" ] || usage "requirements.lock pins no jax version"
  printf '%s' "$version"
}
