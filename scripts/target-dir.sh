# Sourced by the bench scripts: TARGET, cargo's target directory (it need
# not be ./target: CARGO_TARGET_DIR or .cargo/config may put it elsewhere).
TARGET=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
