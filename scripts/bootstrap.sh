# Sourced by run.sh and test.sh: make ./.venv hold this project and the given extras.
# Usage: bootstrap "" | bootstrap "[test]"
bootstrap() {
  local extras="$1"
  local python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "openai-proxy needs Python 3.11 or newer (found: $("$python" --version 2>&1))" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
  fi
  # Reinstall only when the dependency list or the requested extras change.
  local stamp=".venv/.installed"
  local want
  want="$(cat pyproject.toml; echo "$extras")"
  want="$(printf '%s' "$want" | .venv/bin/python -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "Installing openai-proxy${extras} into .venv ..." >&2
    # Build chatter goes to a log, shown only if the install fails.
    if ! { .venv/bin/python -m pip install --quiet --upgrade pip &&
           .venv/bin/python -m pip install --quiet -e ".${extras}"; } > .venv/install.log 2>&1; then
      cat .venv/install.log >&2
      exit 1
    fi
    echo "$want" > "$stamp"
  fi
}
