# nix/module.nix evaluated by the real NixOS module system (nixpkgs' lib.evalModules) without the rest of
# nixpkgs, for machines where nixpkgs cannot be fetched but its lib/ can (tests/test_nix.py). With the real
# sops-nix and microvm.nix host modules when their sources are given, so the guards, the defaults and the
# unit ordering read from config.sops, config.microvm and config.systemd.services run against what those
# projects really declare and define.
#
# What is not real here, and therefore not checked: the NixOS options that module.nix, sops-nix and
# microvm.nix read or set are declared loosely below instead of by NixOS's modules; pkgs is reduced to
# formats.yaml (the YAML type without its generator: the document is returned as a value, and its path
# depends on it as a real store path does, so the unit cannot be had without the document) and the
# package is a placeholder. What is checked as NixOS checks it: _module.check stays on, so a definition
# of an option nobody declares (a misspelt one) fails the evaluation, and so do failed assertions.
# `nix flake check` evaluates the module in a whole NixOS system instead.
{
  lib,
  sops-nix ? null,
  microvm ? null,
  configuration ? { },
}:
let
  inherit (lib) mkOption types;

  valueType =
    with types;
    nullOr (oneOf [
      bool
      int
      float
      str
      path
      (attrsOf valueType)
      (listOf valueType)
    ]);

  pkgs = {
    formats.yaml = { }: {
      type = valueType;
      generate =
        name: value:
        let
          hash = builtins.substring 0 32 (builtins.hashString "sha256" (builtins.toJSON value));
        in
        {
          outPath = "/nix/store/${hash}-${name}";
          inherit value;
        };
    };
  };

  loose = default: type: mkOption { inherit default type; };

  # Each option declared here is one that NixOS 25.05 declares and that module.nix, sops-nix or
  # microvm.nix's host module reads or defines; its default is NixOS's. These are all the real modules
  # need from NixOS to evaluate with _module.check on (it used to be off for them), and every other
  # undeclared definition stays an error.
  nixosOptions = {
    options = {
      # What module.nix sets.
      systemd.services = loose { } (types.attrsOf (types.attrsOf types.anything));
      systemd.paths = loose { } (types.attrsOf (types.attrsOf types.anything));
      systemd.timers = loose { } (types.attrsOf (types.attrsOf types.anything));
      users.users = loose { } (types.attrsOf (types.attrsOf types.anything));
      users.groups = loose { } (types.attrsOf (types.attrsOf types.anything));
      networking.firewall.allowedTCPPorts = loose [ ] (types.listOf types.port);

      # NixOS's own checks, evaluated below as NixOS evaluates them; mkRenamedOptionModule (in sops-nix)
      # defines warnings.
      assertions = loose [ ] (types.listOf types.unspecified);
      warnings = loose [ ] (types.listOf types.str);

      # What sops-nix reads to choose how it installs secrets (systemd units with systemd-sysusers or
      # userborn, activation scripts otherwise) and where its key comes from.
      systemd.sysusers.enable = loose false types.bool;
      services.userborn.enable = loose false types.bool;
      users.mutableUsers = loose true types.bool;
      services.openssh.enable = loose false types.bool;
      services.openssh.hostKeys = loose [ ] (types.listOf types.unspecified);

      # What sops-nix and microvm.nix's host module define besides systemd.services and users.users.
      system.activationScripts = loose { } (types.attrsOf types.unspecified);
      system.build = loose { } (types.lazyAttrsOf types.unspecified);
      boot.kernelModules = loose [ ] (types.listOf types.str);
      environment.systemPackages = loose [ ] (types.listOf types.unspecified);
      environment.etc = loose { } (types.attrsOf types.unspecified);
      # As NixOS declares it: rules of one name, merged path by path, from several modules.
      systemd.tmpfiles.settings = loose { } (types.attrsOf (types.attrsOf (types.attrsOf types.anything)));
      systemd.targets = loose { } (types.attrsOf types.unspecified);
      security.pam.loginLimits = loose [ ] (types.listOf types.unspecified);
      security.wrappers = loose { } (types.attrsOf types.unspecified);
      hardware.ksm.enable = loose false types.bool;
    };
  };

  placeholderPackage = {
    type = "derivation";
    name = "sops-nix-exporter";
    outPath = "/nix/store/11111111111111111111111111111111-sops-nix-exporter";
    meta.mainProgram = "sops-nix-exporter";
  };

  evaluated = lib.evalModules {
    specialArgs = {
      inherit pkgs;
    };
    modules =
      [
        nixosOptions
        ./module.nix
        { services.sops-nix-exporter.package = placeholderPackage; }
        configuration
      ]
      ++ lib.optional (sops-nix != null) (sops-nix + "/modules/sops")
      ++ lib.optional (microvm != null) (microvm + "/nixos-modules/host");
  };
  inherit (evaluated) config;
  cfg = config.services.sops-nix-exporter;
  service = config.systemd.services.sops-nix-exporter or null;
  fingerprintService = config.systemd.services.sops-nix-exporter-fingerprint or null;

  # What module.nix hands to pkgs.formats.yaml's generate, and the file generated from it, which both units
  # run with.
  document =
    if service == null then null else (import ./settings.nix).document { inherit (cfg) settings memoryBudget; };
  configFile = (pkgs.formats.yaml { }).generate "sops-nix-exporter.yml" document;

  # As nixos/modules/system/activation/top-level.nix refuses a system.
  failedAssertions = map (assertion: assertion.message) (
    lib.filter (assertion: !assertion.assertion) config.assertions
  );
in
if failedAssertions != [ ] then
  throw "\nFailed assertions:\n${lib.concatMapStrings (message: "- ${message}\n") failedAssertions}"
else
  {
    inherit service fingerprintService;
    fingerprintPath = config.systemd.paths.sops-nix-exporter-fingerprint or null;
    pruneService = config.systemd.services.sops-nix-exporter-prune or null;
    pruneTimer = config.systemd.timers.sops-nix-exporter-prune or null;
    tmpfiles = config.systemd.tmpfiles.settings.sops-nix-exporter or null;
    configFile = if service == null then null else configFile.outPath;
    # Every unit defined on this host, by module.nix, sops-nix and microvm.nix alike.
    units = builtins.attrNames config.systemd.services;
    users = lib.filterAttrs (name: _: name == "sops-nix-exporter") config.users.users;
    groups = lib.filterAttrs (name: _: name == "sops-nix-exporter") config.users.groups;
    firewall = config.networking.firewall.allowedTCPPorts;
    inherit document;
    ruleFiles = map toString cfg.ruleFiles;
  }
