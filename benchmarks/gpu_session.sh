#!/bin/sh
# Every GPU check in one command, for one call of a lent GPU machine (about 5 minutes on an
# H200, estimated from this session's runs): benchmarks/gpu_check.py whole, then
# benchmarks/profile_step.py on Bios's and the plain loop's Llama-3.2-1B step and on Bios's
# Llama-3.1-8B step. Logs and the check's JSON go to $1, else $OUT, else /tmp/bios-gpu; the
# check's table is printed as well.
#
#     sh benchmarks/gpu_session.sh [folder]
#
# The project's H200 machine lacks Bios's dependency pydantic. Fetch its wheels here first,
# into .whl/ (ignored by git through .git/info/exclude), and carry that folder:
#
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#         typing-inspection==0.4.5 typing_extensions==4.16.0
#
# (the versions this checkout's .venv has; `pip list` there says which.) Where .whl/ exists,
# they are installed into /tmp/site and put on PYTHONPATH. Each step's failure is its own: the
# script goes on, and exits with the check's status.
set -u
out=${1:-${OUT:-/tmp/bios-gpu}}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 benchmarks/gpu_check.py --json "$out/gpu_check.json" >"$out/gpu_check.log" 2>&1
status=$?
python3 benchmarks/profile_step.py --shape Llama-3.2-1B --ablations >"$out/profile_1b.log" 2>&1
python3 benchmarks/profile_step.py --shape Llama-3.2-1B --side plain >"$out/profile_1b_plain.log" 2>&1
python3 benchmarks/profile_step.py --shape Llama-3.1-8B >"$out/profile_8b.log" 2>&1
# The check's table (its lines from the header on), and the profiles' summary lines.
sed -n '/^Bios GPU check/,$p' "$out/gpu_check.log"
grep -h -E "^(bios|plain):|^memory:|^saved for|^step |^ablation:" "$out"/profile_*.log
exit $status
