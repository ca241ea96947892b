/* A SPANK plugin that accepts pyxis' command-line options and does nothing else.
 *
 * Real pyxis runs each task in an enroot container; neither exists on a machine without GPUs
 * and Docker. With this stub loaded (PlugStackConfig), sbatch/srun/salloc accept the same
 * --container-* options, so the launcher's generated scripts are checked against a real Slurm.
 * Each option's value is exported to the task as PYXIS_STUB_<NAME> so tests can see it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <slurm/spank.h>

SPANK_PLUGIN(pyxis_stub, 1);

static int remember(int val, const char *optarg, int remote);

static struct spank_option options[] = {
    {"container-image", "[USER@][REGISTRY#]IMAGE[:TAG]|PATH", "stub of pyxis --container-image", 1, 1, remember},
    {"container-mounts", "SRC:DST[:FLAGS][,...]", "stub of pyxis --container-mounts", 1, 2, remember},
    {"container-workdir", "PATH", "stub of pyxis --container-workdir", 1, 3, remember},
    {"container-name", "NAME", "stub of pyxis --container-name", 1, 4, remember},
    {"container-save", "PATH", "stub of pyxis --container-save", 1, 5, remember},
    {"container-env", "NAME[,NAME...]", "stub of pyxis --container-env", 1, 6, remember},
    {"container-mount-home", NULL, "stub of pyxis --container-mount-home", 0, 7, remember},
    {"no-container-mount-home", NULL, "stub of pyxis --no-container-mount-home", 0, 8, remember},
    {"container-remap-root", NULL, "stub of pyxis --container-remap-root", 0, 9, remember},
    {"no-container-remap-root", NULL, "stub of pyxis --no-container-remap-root", 0, 10, remember},
    {"container-entrypoint", NULL, "stub of pyxis --container-entrypoint", 0, 11, remember},
    {"no-container-entrypoint", NULL, "stub of pyxis --no-container-entrypoint", 0, 12, remember},
    {"container-writable", NULL, "stub of pyxis --container-writable", 0, 13, remember},
    {"container-readonly", NULL, "stub of pyxis --container-readonly", 0, 14, remember},
    SPANK_OPTIONS_TABLE_END
};

static const char *names[] = {"", "IMAGE", "MOUNTS", "WORKDIR", "NAME", "SAVE", "ENV",
                              "MOUNT_HOME", "NO_MOUNT_HOME", "REMAP_ROOT", "NO_REMAP_ROOT",
                              "ENTRYPOINT", "NO_ENTRYPOINT", "WRITABLE", "READONLY"};
static char *values[15];

static int remember(int val, const char *optarg, int remote) {
    if (val <= 0 || val >= 15) return 0;
    free(values[val]);
    values[val] = strdup(optarg ? optarg : "1");
    return 0;
}

/* registered here rather than through a spank_options table: sbatch and salloc (the allocator
 * context) only see options that slurm_spank_init registers */
int slurm_spank_init(spank_t sp, int ac, char **av) {
    for (struct spank_option *o = options; o->name; o++) {
        if (spank_option_register(sp, o) != ESPANK_SUCCESS) return -1;
    }
    return 0;
}

int slurm_spank_user_init(spank_t sp, int ac, char **av) {
    char key[64];
    for (int i = 1; i < 15; i++) {
        if (!values[i]) continue;
        snprintf(key, sizeof key, "PYXIS_STUB_CONTAINER_%s", names[i]);
        spank_setenv(sp, key, values[i], 1);
    }
    return 0;
}
