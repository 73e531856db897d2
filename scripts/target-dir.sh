# Sourced by the bench scripts: TARGET, cargo's target directory (it need
# not be ./target: CARGO_TARGET_DIR or .cargo/config may put it elsewhere).
TARGET=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

# The smoke runs' debug build. With --tests in the same invocation the
# binaries get the dev-dependencies' features unified in, as the test
# suite's (and `cargo bench`'s) build has them, so after the suite this
# only links device-sim. A plain `cargo build -p hub -p device-sim`
# resolves features without them and compiles the hub, sqlx, tonic and
# reqwest a second time (~1.5 min in CI).
smoke_build() { cargo build -q --workspace --bins --tests; }
