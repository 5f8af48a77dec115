# Sourced first by every launcher script: `usage_if_asked "$0" "$@"` prints the script's header comment (its usage)
# and exits 0 when -h or --help stands anywhere on the command line, so asking for help never submits or launches.
usage_if_asked() {
  local script=$1 arg
  shift
  for arg in "$@"; do
    if [ "$arg" = -h ] || [ "$arg" = --help ]; then
      sed -n '2,${/^#SBATCH/q;/^#/!q;s/^# \{0,1\}//;p}' "$script"
      exit 0
    fi
  done
}

# `quoted WORD...`: the words as one shell-quoted line (printf %q), to print a command that runs as shown.
quoted() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}
