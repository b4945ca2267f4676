#!/usr/bin/env bash
# Virtual environments for the embedding-server peers of benchmarks/embeddings.py: Infinity and LitServe, each in
# its own venv (their pins must not touch the project's venv). Each venv sees the project venv's packages (torch,
# transformers, sentence-transformers) through a .pth file, so torch is not downloaded again; a peer's own pins
# install into its venv and take precedence.
#   usage: benchmarks/peers/setup_embed_peers.sh     (venvs $PEERS_DIR/{infinity,litserve}-venv; default
#          PEERS_DIR benchmarks/.peers, gitignored)
set -euo pipefail
PEERS_DIR=${PEERS_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.peers}
PROJECT_PY=${PROJECT_PY:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}
[ -x "$PROJECT_PY" ] || PROJECT_PY=/work/main/.venv/bin/python
SITE=$("$PROJECT_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
BASE_PY=$("$PROJECT_PY" -c "import sys; print(sys._base_executable)")
mkdir -p "$PEERS_DIR"
setup() {  # name, pip requirement...
  local name=$1; shift
  local venv="$PEERS_DIR/$name-venv"
  [ -x "$venv/bin/python" ] || "$BASE_PY" -m venv "$venv"
  local own_site
  own_site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$SITE" > "$own_site/zz_inferd_project.pth"
  timeout 900 "$venv/bin/python" -m pip install -q "$@"
  echo "$name: $venv/bin/python"
}
setup infinity "infinity-emb[server,torch]==0.0.78"
setup litserve "litserve==0.2.19"
