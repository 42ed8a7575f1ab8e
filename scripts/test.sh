#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the peers, builds, checks formatting, publishes the native
# spindle executable, runs every test (the ones that run the spindle command run that executable).
# Usage: scripts/test.sh [extra dotnet test arguments, e.g. --filter FullyQualifiedName~Interop]
set -euo pipefail
cd "$(dirname "$0")/.."

export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1

scripts/install-deps.sh

echo "== build"
dotnet build Spindle.slnx -c Release -warnaserror -nologo -v quiet

echo "== format"
dotnet format Spindle.slnx --verify-no-changes --no-restore -v quiet || {
  echo "formatting differs: run 'dotnet format Spindle.slnx' and commit" >&2
  exit 1
}

echo "== native spindle"
# The command users run: ./spindle publishes it (Native AOT, -warnaserror) into artifacts/spindle; with
# SPINDLE_BUILD=native a failed native build fails here instead of falling back to ReadyToRun. Every test that runs
# the spindle command runs this executable (tests/Spindle.Testing/SpindleExecutable.cs reads SPINDLE_CLI).
SPINDLE_BUILD=native ./spindle --version
export SPINDLE_CLI="$PWD/artifacts/spindle/spindle"

echo "== packages"
# The NuGet packages (Spindle.Protocol, Spindle.Wire, Spindle.Storage, Spindle.Client, and Spindle.Cli as a dotnet
# tool) from the build above, into a local feed; tests/Spindle.Ops.Tests/PackageTests.cs installs them from there.
rm -rf artifacts/packages
dotnet pack Spindle.slnx -c Release --no-build -nologo -v quiet -o artifacts/packages
export SPINDLE_PACKAGES="$PWD/artifacts/packages"

echo "== test"
dotnet test Spindle.slnx -c Release --no-build -nologo --logger "console;verbosity=normal" "$@"

# Coverage-guided fuzzing, bounded: every target for SPINDLE_FUZZ_SECONDS (default 20) under AFL++. Skipped when a
# filter picks some tests only (extra arguments), as the point then is a quick look at those.
if [ $# -eq 0 ]; then
  echo "== fuzz"
  scripts/fuzz.sh "${SPINDLE_FUZZ_SECONDS:-20}"
fi
