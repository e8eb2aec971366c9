/* qkd: the command-line tool over libqkd's public API. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

/* qkd help [COMMAND] */
static int help(int argc, char **argv)
{
    if (argc < 3) {
        cli_print_help(NULL);
        return CLI_EXIT_OK;
    }
    const cli_command *cmd = cli_find_command(argv[2]);
    if (!cmd)
        return cli_usage_error(NULL, "no command '%s'", argv[2]);
    cli_print_help(cmd);
    return CLI_EXIT_OK;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return cli_usage_error(NULL, "missing COMMAND");
    const char *name = argv[1];
    if (!strcmp(name, "--version") || !strcmp(name, "-V")) {
        printf("qkd %s\n", qkd_version_string());
        return CLI_EXIT_OK;
    }
    if (!strcmp(name, "help") || !strcmp(name, "--help") || !strcmp(name, "-h"))
        return help(argc, argv);
    const cli_command *cmd = cli_find_command(name);
    if (!cmd)
        return cli_usage_error(NULL, "unknown command '%s'", name);
    return cmd->run(argc - 1, argv + 1);
}
