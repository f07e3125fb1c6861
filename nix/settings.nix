# The exporter's configuration as the NixOS module writes it, in plain Nix (builtins only, so that
# tests/test_nix.py can evaluate it and hand the result to the exporter's own validator).
let
  regularStore = {
    mountpoint = "/run/secrets.d";
    symlink = "/run/secrets";
  };
  forUsersStore = {
    mountpoint = "/run/secrets-for-users.d";
    symlink = "/run/secrets-for-users";
  };

  # Drops null attributes at every depth: null means "the exporter's default", said by omission.
  withoutNulls =
    value:
    if builtins.isAttrs value then
      builtins.mapAttrs (_: withoutNulls) (
        builtins.removeAttrs value (builtins.filter (name: value.${name} == null) (builtins.attrNames value))
      )
    else if builtins.isList value then
      map withoutNulls value
    else
      value;
in
{
  # The exporter's own default (exporter/config.py, DEFAULT_FINGERPRINT_DIR): on /run, gone at reboot like
  # the generations it describes.
  defaultFingerprintDir = "/run/sops-nix-exporter/fingerprints";

  # The stores sops-nix manages on this host. `sops` is config.sops when sops-nix's NixOS module is
  # imported, else null: then both standard stores, as the exporter itself assumes without a file.
  # sops-nix always owns /run/secrets.d; /run/secrets-for-users.d only exists when a secret sets
  # neededForUsers. Both are pruned by the same sops.keepGenerations.
  defaultStores =
    sops:
    if sops == null then
      [
        regularStore
        forUsersStore
      ]
    else
      let
        keep = {
          keep_generations = sops.keepGenerations;
        };
        forUsers = builtins.any (secret: secret.neededForUsers or false) (builtins.attrValues (sops.secrets or { }));
      in
      [ (regularStore // keep) ] ++ (if forUsers then [ (forUsersStore // keep) ] else [ ]);

  # The document written to the configuration file. memoryBudget (bytes, or null) applies to every
  # store that sets no memory_budget_bytes of its own.
  document =
    {
      settings,
      memoryBudget ? null,
    }:
    let
      budgeted =
        store:
        if memoryBudget != null && (store.memory_budget_bytes or null) == null then
          store // { memory_budget_bytes = memoryBudget; }
        else
          store;
    in
    withoutNulls (settings // { stores = map budgeted settings.stores; });
}
