/* Everything bindgen binds: the whole public API. */
#include <qkd/qkd.h>
