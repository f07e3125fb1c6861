# NixOS module: services.sops-nix-exporter.
#
# The systemd unit, the command line and the configuration document come from service.nix and
# settings.nix, which need no nixpkgs; this file declares the options and wires them together.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types literalExpression;

  cfg = config.services.sops-nix-exporter;
  unit = import ./service.nix;
  configuration = import ./settings.nix;
  repo = import ./repo.nix;
  format = pkgs.formats.yaml { };

  # Guards, so the module also evaluates on hosts that import neither sops-nix nor microvm.nix.
  sopsImported = options ? sops;
  microvmHostImported = options ? microvm && options.microvm ? stateDir;

  # The units that install the secrets, on the hosts where sops-nix defines them (modules/sops):
  # sops-install-secrets.service when a secret is not neededForUsers and sops.useSystemdActivation is on
  # (its default with systemd-sysusers or userborn); sops-install-secrets-for-users.service when a secret
  # is neededForUsers and systemd-sysusers or userborn manage the users, whatever useSystemdActivation
  # says. Otherwise an activation script installs those secrets before any service starts, there is no
  # unit to order after, and none is named. Asking config.systemd.services instead of repeating sops-nix's
  # conditions keeps this right when they change.
  secretsUnits = lib.optionals sopsImported (
    lib.filter (name: config.systemd.services ? ${name}) [
      "sops-install-secrets"
      "sops-install-secrets-for-users"
    ]
  );

  absolutePath = types.strMatching "/.*";

  storeOptions = {
    options = {
      mountpoint = mkOption {
        type = absolutePath;
        description = "The mount point holding the numbered generation directories.";
      };
      symlink = mkOption {
        type = absolutePath;
        description = "The symlink sops-nix points at the current generation.";
      };
      keep_generations = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = ''
          sops-nix's `keepGenerations` for this store (0 keeps every generation). Unset, the
          exporter cannot predict which VM share the next switch will empty.
        '';
      };
      memory_budget_bytes = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = "Memory this store may hold; unset, {option}`services.sops-nix-exporter.memoryBudget` applies.";
      };
    };
  };

  secretsAfter = map (name: "${name}.service") secretsUnits;
  fingerprintDir = cfg.settings.fingerprint_dir;
  symlinks = map (store: store.symlink) cfg.settings.stores;
  # The units of the path unit on the symlinks: the fingerprint oneshot, which pulls in the prune; with
  # fingerprints off, the prune itself.
  switchUnit = if cfg.fingerprints.enable then "${unit.fingerprintUnit}.service" else "${unit.pruneUnit}.service";

  configFile = format.generate "sops-nix-exporter.yml" (
    configuration.document { inherit (cfg) settings memoryBudget; }
  );
in
{
  options.services.sops-nix-exporter = {
    enable = lib.mkEnableOption "the Prometheus exporter for sops-nix secrets generations and VM shares";

    package = mkOption {
      type = types.package;
      default = pkgs.sops-nix-exporter or (pkgs.callPackage ./package.nix { });
      defaultText = literalExpression "pkgs.sops-nix-exporter or (pkgs.callPackage ./nix/package.nix { })";
      description = "The exporter package.";
    };

    port = mkOption {
      type = types.port;
      default = 9785;
      description = "TCP port of /metrics.";
    };

    listenAddress = mkOption {
      type = types.str;
      default = "";
      example = "127.0.0.1";
      description = ''
        Address to listen on. Empty means every IPv4 and IPv6 address; an IPv6 address is written
        without brackets.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open {option}`services.sops-nix-exporter.port` in the firewall.";
    };

    settings = mkOption {
      default = { };
      description = ''
        The exporter's configuration, written to a YAML file (see docs/deployment.md). Every key
        the exporter reads is declared here, and only those: an unknown key is refused when the
        configuration is evaluated, as the exporter would refuse it when the service starts.
      '';
      type = types.submodule {
        options = {
          stores = mkOption {
            type = types.listOf (types.submodule storeOptions);
            default = configuration.defaultStores (if sopsImported then config.sops else null);
            defaultText = lib.literalMD ''
              With sops-nix's module imported: `/run/secrets.d` (symlink `/run/secrets`), and
              `/run/secrets-for-users.d` (symlink `/run/secrets-for-users`) when any secret sets
              `neededForUsers`, both with `keep_generations = config.sops.keepGenerations`.
              Without it: both stores, `keep_generations` unset.
            '';
            description = "The sops-nix stores to watch; by default those sops-nix manages on this host.";
          };
          fingerprint_dir = mkOption {
            type = absolutePath;
            default = configuration.defaultFingerprintDir;
            description = ''
              Where `sops-nix-exporter fingerprint` writes the content fingerprints and the exporter
              reads them. With {option}`services.sops-nix-exporter.fingerprints.enable`, the module
              makes it (0750, root and the exporter's group) and lets only the fingerprint oneshot write.
            '';
          };
          memory_budget_ratio = mkOption {
            type = types.nullOr (types.addCheck types.number (ratio: ratio > 0 && ratio <= 1));
            default = null;
            example = 0.02;
            description = ''
              Share of the host's memory a store may hold, for stores without a budget in bytes.
              Unset, the exporter's default (0.01) applies.
            '';
          };
          microvm.state_dir = mkOption {
            type = absolutePath;
            default = cfg.microvmStateDir;
            defaultText = literalExpression "config.services.sops-nix-exporter.microvmStateDir";
            description = "microvm.nix's state directory, where the declared VM shares are found.";
          };
        };
      };
    };

    fingerprints.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        With the exporter enabled, fingerprint the contents of every linked generation, so that the
        exporter can tell a VM serving an older generation with the same values from one serving
        outdated secrets (docs/deployment.md, "Content fingerprints"): a oneshot
        `sops-nix-exporter-fingerprint.service`, root without network and with only
        CAP_DAC_READ_SEARCH and CAP_CHOWN, run at boot and by a path unit whenever a store's symlink
        changes. Nothing waits for it: a failure fails that oneshot, never an activation.
      '';
    };

    prune.enable = mkOption {
      type = types.bool;
      default = false;
      description = ''
        With the exporter enabled, remove the generations nobody reads (`sops-nix-exporter prune --apply`,
        docs/deployment.md, "Pruning"): no VM share, no mount namespace, no process's working directory,
        root or descriptor holds them, and they are neither the current one, a pending one nor the one
        just replaced. A oneshot `sops-nix-exporter-prune.service`, root without network, writing only in
        the stores and bounded to CAP_SYS_PTRACE, run after every switch (by the path unit on the stores'
        symlinks, after the fingerprints) and hourly (a timer). Nothing waits for it: a failure fails that
        oneshot, never an activation. Requires `sops.keepGenerations = 0`, so that sops-nix itself deletes
        nothing: the recommended setup for hosts that share secrets with VMs or containers.
      '';
    };

    memoryBudget = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = null;
      example = literalExpression "64 * 1024 * 1024";
      description = ''
        Bytes of memory each store may hold before the budget alerts fire, for every store that
        sets no `memory_budget_bytes` of its own. Unset, the budget is `memory_budget_ratio` of
        the host's memory.
      '';
    };

    microvmStateDir = mkOption {
      type = absolutePath;
      default = if microvmHostImported then toString config.microvm.stateDir else "/var/lib/microvms";
      defaultText = lib.literalMD ''
        `config.microvm.stateDir` with microvm.nix's host module imported, else `"/var/lib/microvms"`
      '';
      description = "Where microvm.nix keeps its VMs; the exporter reads the declared shares there.";
    };

    webConfigFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = literalExpression ''config.sops.secrets."sops-nix-exporter/web.yml".path'';
      description = ''
        Web configuration in the format Prometheus exporters share (TLS certificate and key,
        basic-auth users with bcrypt hashes), passed as `--web.config.file`. It must be readable
        by the user `sops-nix-exporter`. A path literal is copied into the world-readable Nix
        store: for anything secret, give a sops-nix secret with `owner = "sops-nix-exporter"`.
      '';
    };

    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--log.level=debug"
        "--log.format=json"
      ];
      description = "Further command-line flags of `sops-nix-exporter serve`.";
    };

    dashboards = mkOption {
      type = types.path;
      readOnly = true;
      default = repo.dashboards;
      defaultText = lib.literalMD "the `grafana/dashboards/*.json` of this repository";
      description = ''
        Grafana dashboards, as a directory for a file provider (set whether or not the exporter is
        enabled on this host):

        ```nix
        services.grafana.provision.dashboards.settings.providers = [
          { name = "sops-nix"; options.path = config.services.sops-nix-exporter.dashboards; }
        ];
        ```
      '';
    };

    ruleFiles = mkOption {
      type = types.listOf types.path;
      readOnly = true;
      default = repo.ruleFiles;
      defaultText = lib.literalMD "the `alerts/*.rules.yml` of this repository";
      description = ''
        Prometheus alerting and recording rules:
        `services.prometheus.ruleFiles = config.services.sops-nix-exporter.ruleFiles;`
        They expect the scrape job to be named `sops-nix`.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.${unit.user} = {
      isSystemUser = true;
      group = unit.user;
      description = "sops-nix exporter";
    };
    users.groups.${unit.user} = { };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.port ];

    systemd.services.sops-nix-exporter = unit.service {
      command = unit.command {
        executable = lib.getExe cfg.package;
        inherit configFile;
        inherit (cfg) webConfigFile extraFlags;
        listenAddress = unit.listenAddress cfg.listenAddress cfg.port;
      };
      after = secretsAfter;
    };

    systemd.services.${unit.fingerprintUnit} = lib.mkIf cfg.fingerprints.enable (
      unit.fingerprintService {
        command = unit.fingerprintCommand {
          executable = lib.getExe cfg.package;
          inherit configFile;
        };
        inherit fingerprintDir;
        after = secretsAfter;
      }
    );

    systemd.paths.${unit.fingerprintUnit} = lib.mkIf (cfg.fingerprints.enable || cfg.prune.enable) (
      unit.fingerprintPath {
        inherit symlinks;
        unit = switchUnit;
      }
    );

    systemd.services.${unit.pruneUnit} = lib.mkIf cfg.prune.enable (
      unit.pruneService {
        command = unit.pruneCommand {
          executable = lib.getExe cfg.package;
          inherit configFile;
        };
        mountpoints = map (store: store.mountpoint) cfg.settings.stores;
        after = secretsAfter;
        wantedBy = lib.optional cfg.fingerprints.enable "${unit.fingerprintUnit}.service";
      }
    );

    systemd.timers.${unit.pruneUnit} = lib.mkIf cfg.prune.enable unit.pruneTimer;

    systemd.tmpfiles.settings.sops-nix-exporter = lib.mkIf (cfg.fingerprints.enable || cfg.prune.enable) (
      lib.mkMerge (
      map
        (directory: {
          ${directory.path}.${directory.type} = { inherit (directory) mode user group; };
        })
        (
          lib.optional cfg.fingerprints.enable (unit.fingerprintDirectory fingerprintDir)
          ++ lib.optional cfg.prune.enable unit.pruneLockDirectory
        )
      )
    );

    # sops-nix deletes old generations at every switch when keepGenerations is not 0, whether a VM serves
    # them or not; the prune then keeps nothing sops-nix has not already taken.
    assertions = lib.optional (cfg.prune.enable && sopsImported) {
      assertion = config.sops.keepGenerations == 0;
      message = ''
        services.sops-nix-exporter.prune.enable needs sops.keepGenerations = 0 (it is ${toString config.sops.keepGenerations}).
        With any other value sops-nix itself deletes old generations at every switch, including those VMs
        and containers still serve, whatever the prune keeps; with 0 sops-nix deletes nothing and the prune
        removes only the generations nobody reads.
      '';
    };
  };
}
