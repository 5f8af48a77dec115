#!/bin/bash
# One node, every GPU: allo run on this recipe (see recipes/run_one_node.sh for options).
exec "$(dirname "$0")/../run_one_node.sh" "$(dirname "$0")/recipe.yaml" "$@"
