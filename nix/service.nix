# The exporter's systemd service as plain Nix values.
#
# Only builtins are used here, no nixpkgs, so that `nix-instantiate --eval` can check these values
# where nixpkgs cannot be fetched (tests/test_nix.py does). The NixOS module (module.nix) gives
# `service` its command line and the units to start after, and sets nothing else on the unit;
# docs/deployment.md shows the same [Service] settings for hosts without NixOS, and the tests keep
# the two equal.
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

  # systemd reads ExecStart= words C-style: a JSON string is one quoted word it reads back exactly,
  # once % (specifiers) and $ (environment variables) are doubled.
  escapeExecArg = arg: builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg);

  hasColon = s: builtins.match ".*:.*" s != null;
  bracketed = s: builtins.match "\\[.*]" s != null;
in
{
  inherit capabilities user serviceConfig escapeExecArg;

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
}
