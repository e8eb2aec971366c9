/* Status names and descriptions, generated from the one table in core.h. */
#include "qkd/core.h"

const char *qkd_status_name(qkd_status status)
{
    switch (status) {
#define QKD__STATUS_NAME(name, value, text) case QKD_##name: return "QKD_" #name;
        QKD_STATUS_MAP(QKD__STATUS_NAME)
#undef QKD__STATUS_NAME
    }
    return "QKD_UNKNOWN_STATUS";
}

const char *qkd_status_str(qkd_status status)
{
    switch (status) {
#define QKD__STATUS_TEXT(name, value, text) case QKD_##name: return text;
        QKD_STATUS_MAP(QKD__STATUS_TEXT)
#undef QKD__STATUS_TEXT
    }
    return "unknown status";
}

unsigned qkd_version(void)
{
    return QKD_VERSION_NUMBER;
}

#define QKD__STR2(x) #x
#define QKD__STR(x) QKD__STR2(x)

const char *qkd_version_string(void)
{
    return QKD__STR(QKD_VERSION_MAJOR) "." QKD__STR(QKD_VERSION_MINOR) "."
           QKD__STR(QKD_VERSION_PATCH);
}
