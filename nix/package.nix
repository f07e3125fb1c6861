{
  lib,
  python3Packages,
}:

let
  repo = import ./repo.nix;
in
python3Packages.buildPythonApplication {
  pname = "sops-nix-exporter";
  inherit (repo) version;
  pyproject = true;

  # The tests read docs/, alerts/, grafana/ and the Nix files too. Downloaded VM kernels and bytecode
  # stay out.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.difference
      (lib.fileset.unions (
        map lib.fileset.maybeMissing [
          ../pyproject.toml
          ../README.md
          ../exporter
          ../tests
          ../docs
          ../alerts
          ../grafana
          ../flake.nix
          ../nix
        ]
      ))
      (lib.fileset.unions [
        (lib.fileset.maybeMissing ../tests/vm/cache)
        (lib.fileset.fileFilter (file: file.hasExt "pyc") ../exporter)
        (lib.fileset.fileFilter (file: file.hasExt "pyc") ../tests)
        (lib.fileset.fileFilter (file: file.hasExt "pyc") ../nix)
      ]);
  };

  build-system = with python3Packages; [
    setuptools
    wheel
  ];

  dependencies = with python3Packages; [
    prometheus-client
    psutil
    pydantic
    pyyaml
    # basic_auth_users of --web.config.file are bcrypt hashes; a dependency in pyproject too.
    bcrypt
  ];

  nativeCheckInputs = with python3Packages; [
    pytestCheckHook
    requests
  ];

  # The Nix sandbox runs the tests as an unprivileged user with no network but loopback. Tests that
  # mount stores or start pinning processes as root ask for the `require_root` fixture and skip
  # themselves there; tests that need promtool, Prometheus or nix-instantiate skip when the tool is
  # not on PATH. The VM tests need QEMU, /dev/kvm and a guest kernel downloaded with apt-get: never in
  # the sandbox.
  disabledTestPaths = [
    "tests/vm"
    "tests/test_vm_e2e.py"
  ];

  pythonImportsCheck = [ "sops_nix_exporter" ];

  passthru = {
    # For services.grafana.provision and services.prometheus.ruleFiles; see docs/deployment.md.
    inherit (repo) dashboards ruleFiles;
  };

  meta = {
    description = "Prometheus exporter for sops-nix secrets generations and the VM shares that serve them";
    license = lib.licenses.mit;
    mainProgram = "sops-nix-exporter";
    platforms = lib.platforms.linux;
  };
}
