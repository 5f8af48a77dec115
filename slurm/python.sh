# Sourced by every launcher: `choose_python ROOT` sets `python` (the interpreter a job runs allo with) and
# `python_why`, in this order: $ALLO_PYTHON; ROOT/.venv-gpu (`make install-gpu`: CUDA torch); ROOT/.venv (`make
# install`: the CPU torch of `make demo`). It also puts ROOT first on PYTHONPATH, so the allo that runs is this
# checkout's, the one the launcher checked. Exits 2 when none exists.
choose_python() {
  local root=$1
  if [ -n "${ALLO_PYTHON:-}" ]; then
    python=$ALLO_PYTHON python_why="ALLO_PYTHON"
  elif [ -x "$root/.venv-gpu/bin/python" ]; then
    python=$root/.venv-gpu/bin/python python_why=".venv-gpu: make install-gpu's CUDA environment"
  elif [ -x "$root/.venv/bin/python" ]; then
    python=$root/.venv/bin/python python_why=".venv: make install's CPU environment; for GPUs, make install-gpu"
  else
    echo "no Python environment for allo: set ALLO_PYTHON to one (its python), or build $root/.venv-gpu with" \
         "\`make install-gpu\` (GPUs) or $root/.venv with \`make install\` (CPU)" >&2
    exit 2
  fi
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "$python ($python_why): not an executable Python; fix ALLO_PYTHON or rebuild the environment" >&2
    exit 2
  fi
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
}
