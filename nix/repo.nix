# What the Nix files take from the rest of the repository: the exporter's version, and the dashboards
# and alerting rules for services.grafana.provision and services.prometheus.ruleFiles. Builtins only,
# so tests/test_nix.py can evaluate it without nixpkgs.
let
  hasSuffix =
    suffix: string:
    let
      length = builtins.stringLength string;
      suffixLength = builtins.stringLength suffix;
    in
    length >= suffixLength && builtins.substring (length - suffixLength) suffixLength string == suffix;

  filesEndingIn =
    suffix: directory:
    if builtins.pathExists directory then
      builtins.filter (name: hasSuffix suffix name && (builtins.readDir directory).${name} == "regular") (
        builtins.attrNames (builtins.readDir directory)
      )
    else
      [ ];

  # The line `__version__ = "X"` of exporter/__init__.py, the one place the version is written.
  versionPattern = "__version__ = \"([^\"]+)\"";
  versionLines = builtins.filter (line: builtins.isString line && builtins.match versionPattern line != null) (
    builtins.split "\n" (builtins.readFile ../exporter/__init__.py)
  );

  dashboardsDirectory = ../grafana/dashboards;
  rulesDirectory = ../alerts;
in
rec {
  version =
    if builtins.length versionLines == 1 then
      builtins.head (builtins.match versionPattern (builtins.head versionLines))
    else
      throw "exporter/__init__.py must set __version__ exactly once";

  # Grafana's file provider loads every .json below its path; nothing else of the directory is copied.
  dashboardFileNames = filesEndingIn ".json" dashboardsDirectory;
  dashboards = builtins.path {
    name = "sops-nix-exporter-dashboards";
    path = dashboardsDirectory;
    filter = path: type: type == "directory" || hasSuffix ".json" path;
  };

  # Prometheus rule files; alerts/ also holds example Alertmanager routing, which is not one.
  ruleFileNames = filesEndingIn ".rules.yml" rulesDirectory;
  ruleFiles = map (
    name:
    builtins.path {
      name = "sops-nix-exporter-${name}";
      path = rulesDirectory + "/${name}";
    }
  ) ruleFileNames;
}
