# The exporter's systemd units as plain Nix values: its service, the fingerprint oneshot with the path unit
# that starts it, and the prune oneshot with its timer.
#
# Only builtins are used here, no nixpkgs, so that `nix-instantiate --eval` can check these values
# where nixpkgs cannot be fetched (tests/test_nix.py does). The NixOS module (module.nix) gives
# `service` and `fingerprintService` their command lines and the units to start after, and sets nothing
# else on the units; docs/deployment.md shows the same [Service] settings for hosts without NixOS, and the
# tests keep them equal.
let
  # The only privileges the exporter keeps beyond those of its own user and the `keys` group:
  # - CAP_SYS_PTRACE: virtiofsd runs as root, and the kernel lets another user follow a process's
  #   /proc/PID/root and list its /proc/PID/fd only after a ptrace access check. (/proc/PID/mountinfo,
  #   which shows what a namespace-sandboxed virtiofsd serves, is readable without it.) The exporter
  #   only reads these files; the ptrace() system call itself stays blocked by the filter.
  # - CAP_DAC_READ_SEARCH: to list /run/secrets-for-users.d and its generations, which sops-nix
  #   writes root:root, 0751 (sops-install-secrets -ignore-passwd, run before the users and groups
  #   exist), and to walk into the subdirectories of secrets whose modes shut out the `keys` group.
  #   Files are lstat'ed, never opened.
  capabilities = [
    "CAP_DAC_READ_SEARCH"
    "CAP_SYS_PTRACE"
  ];

  user = "sops-nix-exporter";

  serviceConfig = {
    Restart = "on-failure";
    RestartSec = "5s";

    # A static user rather than DynamicUser=: sops-nix delivers the web configuration (TLS key,
    # basic-auth hashes) as a secret owned by this user, and it must exist when secrets are
    # installed, not only while the service runs.
    User = user;
    Group = user;
    # `keys` may list /run/secrets.d and its generations (root:keys, 0751); granted to this service only.
    SupplementaryGroups = "keys";

    AmbientCapabilities = builtins.concatStringsSep " " capabilities;
    CapabilityBoundingSet = builtins.concatStringsSep " " capabilities;
    NoNewPrivileges = true;

    # The whole file system is read-only for the service, /run included, and /home, /root and
    # /run/user are hidden. Mounts made on the host later (a store's ramfs at boot) still propagate
    # into the service's mount namespace; PrivateMounts= only stops propagation the other way.
    ProtectSystem = "strict";
    PrivateMounts = true;
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    DevicePolicy = "closed";
    PrivateIPC = true;
    RemoveIPC = true;
    UMask = "0077";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    KeyringMode = "private";
    # ProtectProc= and ProcSubset= are left at their defaults on purpose: the exporter must see
    # every virtiofsd, whoever runs it, and reads /proc/meminfo for the host's memory. PrivateUsers=
    # is left off too: inside a user namespace the capabilities above would cover nothing of the host.

    RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
    SystemCallErrorNumber = "EPERM";
  };

  # The content fingerprints (`sops-nix-exporter fingerprint`): the one command that opens secrets, run as
  # root in a oneshot of its own. Root here is uid 0 without CAP_DAC_OVERRIDE: the two capabilities are
  # all it keeps.
  # - CAP_DAC_READ_SEARCH: to read every secret whatever its owner and mode (they are 0400 and owned by
  #   their consumers), and to walk the stores.
  # - CAP_CHOWN: to give each fingerprint file the group of the fingerprint directory (the exporter's),
  #   which root is not a member of. The files are root's own, so fchmod needs no CAP_FOWNER.
  fingerprintCapabilities = [
    "CAP_DAC_READ_SEARCH"
    "CAP_CHOWN"
  ];

  fingerprintUnit = "sops-nix-exporter-fingerprint";

  # The fingerprint directory, made at boot by systemd-tmpfiles (and by NixOS at every activation): root's,
  # so that only the oneshot writes in it; readable by the exporter's group, not writable.
  fingerprintDirectory = path: {
    inherit path;
    type = "d";
    mode = "0750";
    user = "root";
    group = user;
  };

  # What the two root oneshots (fingerprint, prune) share: no network, the system read-only, no devices, no
  # new privileges, AF_UNIX only, and the exporter's system-call filter; each adds what it needs below.
  oneshotSandbox = {
    Type = "oneshot";
    PrivateNetwork = true;
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    PrivateMounts = true;
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    DevicePolicy = "closed";
    PrivateIPC = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    KeyringMode = "private";
    RestrictAddressFamilies = "AF_UNIX";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallErrorNumber = "EPERM";
  };

  fingerprintServiceConfig = fingerprintDir: oneshotSandbox // {
    # Everything read-only but the fingerprint directory, which must exist (fingerprintDirectory) for the
    # unit to start.
    ReadWritePaths = fingerprintDir;
    CapabilityBoundingSet = builtins.concatStringsSep " " fingerprintCapabilities;
    # The store directories it makes (0750) must stay readable by the directory's group.
    UMask = "0027";
    ProtectProc = "invisible";
    # @privileged holds @chown: fchown is given back, the rest of it stays blocked.
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
      "@chown"
    ];
  };

  # The prune (`sops-nix-exporter prune --apply`): root in a oneshot of its own, without network, writing
  # only in the stores and in the lock file's directory. Root here is uid 0 bounded to one capability:
  # - CAP_SYS_PTRACE: to read the cwd, root, descriptors and mount table of every other process in /proc
  #   (virtiofsd, containers, services of other users); the kernel checks ptrace access for each.
  # - CAP_DAC_READ_SEARCH: to list another user's /proc/PID/fd (owned by that user, mode 0500). Without it a
  #   process's descriptors cannot be seen, and the prune, failing closed, removes nothing.
  # Nothing more is needed to list and remove: sops-nix makes every directory of a store root's (root:keys
  # or root:root, 0751), and unlinking a file, whoever owns it and whatever its mode, needs only write
  # access to its directory. So no CAP_DAC_OVERRIDE or CAP_FOWNER (tests/test_nix.py runs the real command
  # with exactly this set, and with each one of it missing).
  pruneCapabilities = [
    "CAP_DAC_READ_SEARCH"
    "CAP_SYS_PTRACE"
  ];

  pruneUnit = "sops-nix-exporter-prune";

  # The directory of the prune's default lock file (exporter/prune.py, DEFAULT_LOCK_FILE), kept so that a
  # prune run by hand and the unit's exclude each other. Made by systemd-tmpfiles: the unit cannot make it
  # under ProtectSystem=strict, and ReadWritePaths= needs it to exist.
  pruneLockDirectory = {
    path = "/run/sops-nix-exporter";
    type = "d";
    mode = "0755";
    user = "root";
    group = "root";
  };

  # How often the timer runs the prune, besides after every switch: a VM that stops releases its
  # generation without any symlink changing.
  pruneSchedule = "hourly";

  pruneServiceConfig = mountpoints: oneshotSandbox // {
    # Everything read-only but the stores and the lock's directory. "-": a store not mounted on this host
    # (no secret neededForUsers) is skipped rather than failing the unit.
    ReadWritePaths = map (mountpoint: "-${mountpoint}") mountpoints ++ [ pruneLockDirectory.path ];
    CapabilityBoundingSet = builtins.concatStringsSep " " pruneCapabilities;
    UMask = "0077";
    # ProtectProc= stays at its default: a process the prune cannot see is a reader it would miss.
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
  };

  # systemd reads ExecStart= words C-style: a JSON string is one quoted word it reads back exactly,
  # once % (specifiers) and $ (environment variables) are doubled.
  escapeExecArg = arg: builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg);

  hasColon = s: builtins.match ".*:.*" s != null;
  bracketed = s: builtins.match "\\[.*]" s != null;
in
{
  inherit
    capabilities
    user
    serviceConfig
    escapeExecArg
    fingerprintCapabilities
    fingerprintUnit
    fingerprintDirectory
    fingerprintServiceConfig
    pruneCapabilities
    pruneUnit
    pruneLockDirectory
    pruneSchedule
    pruneServiceConfig
    ;

  # HOST:PORT for --web.listen-address; an IPv6 host gets its brackets, "" means every address.
  listenAddress =
    host: port:
    (if hasColon host && !bracketed host then "[${host}]" else host) + ":${toString port}";

  # The argument vector, first the executable.
  command =
    {
      executable,
      configFile,
      listenAddress,
      webConfigFile ? null,
      extraFlags ? [ ],
    }:
    [
      executable
      "serve"
      "--config.file=${configFile}"
      "--web.listen-address=${listenAddress}"
    ]
    ++ (if webConfigFile == null then [ ] else [ "--web.config.file=${webConfigFile}" ])
    ++ extraFlags;

  # The attributes of systemd.services.sops-nix-exporter; `after` names the units that install
  # the secrets (those that exist on this host), which the service also wants.
  service =
    {
      command,
      after ? [ ],
    }:
    {
      description = "Prometheus exporter for sops-nix secrets generations";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ] ++ after;
      wants = after;
      serviceConfig = serviceConfig // {
        ExecStart = builtins.concatStringsSep " " (map escapeExecArg command);
      };
    };

  # The fingerprint command, first the executable: the same configuration file as the exporter's, so
  # that both agree on the stores and on fingerprint_dir.
  fingerprintCommand =
    { executable, configFile }:
    [
      executable
      "fingerprint"
      "--config.file=${configFile}"
    ];

  # systemd.services.sops-nix-exporter-fingerprint: run at boot and whenever a store's symlink changes
  # (fingerprintPath), ordered after the units that install the secrets exactly as the exporter is. No
  # unit requires it or waits for it but multi-user.target: a failure fails this oneshot only, never the
  # activation that switched the symlink.
  fingerprintService =
    {
      command,
      fingerprintDir,
      after ? [ ],
    }:
    {
      description = "Fingerprint sops-nix secrets generations for sops-nix-exporter";
      wantedBy = [ "multi-user.target" ];
      inherit after;
      wants = after;
      serviceConfig = fingerprintServiceConfig fingerprintDir // {
        ExecStart = builtins.concatStringsSep " " (map escapeExecArg command);
      };
    };

  # systemd.paths.sops-nix-exporter-fingerprint: sops-nix replaces a store's symlink at every switch. It starts
  # the fingerprint oneshot, which pulls in the prune (pruneService); with fingerprints off, the prune itself.
  fingerprintPath =
    {
      symlinks,
      unit ? "${fingerprintUnit}.service",
    }:
    {
      description = "Fingerprint sops-nix secrets generations when a store's symlink changes";
      wantedBy = [ "multi-user.target" ];
      pathConfig = {
        PathChanged = symlinks;
        Unit = unit;
      };
    };

  # The prune command, first the executable: the exporter's configuration file, so that it prunes exactly
  # the stores the exporter watches; the default lock file (pruneLockDirectory).
  pruneCommand =
    { executable, configFile }:
    [
      executable
      "prune"
      "--apply"
      "--config.file=${configFile}"
    ];

  # systemd.services.sops-nix-exporter-prune. `mountpoints`: the stores'; `after`: the units that install the
  # secrets, as for the exporter; `wantedBy`: the fingerprint oneshot when there is one, so that the path
  # unit's start after a switch runs both, the prune last. Ordered after the fingerprints, which then still
  # see the generations they describe. Nothing that an activation waits for wants it or is ordered after
  # it: a failed prune fails this oneshot only.
  pruneService =
    {
      command,
      mountpoints,
      after ? [ ],
      wantedBy ? [ ],
    }:
    {
      description = "Remove the sops-nix secrets generations nobody reads";
      inherit wantedBy;
      after = [ "${fingerprintUnit}.service" ] ++ after;
      wants = after;
      serviceConfig = pruneServiceConfig mountpoints // {
        ExecStart = builtins.concatStringsSep " " (map escapeExecArg command);
      };
    };

  # systemd.timers.sops-nix-exporter-prune: the prune starts hourly too, for the generations VMs and
  # processes released since the last switch.
  pruneTimer = {
    description = "Remove the sops-nix secrets generations nobody reads, hourly";
    wantedBy = [ "timers.target" ];
    timerConfig = {
      OnCalendar = pruneSchedule;
      Unit = "${pruneUnit}.service";
    };
  };
}
