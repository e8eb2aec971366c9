# Sourced by the benchmark scripts that run on the GPU machine, which lacks
# libuv, jansson and check: unless pkg-config finds them, unpack the Debian
# packages carried in .debs/ (apt-get download libuv1 libuv1-dev
# libjansson4 libjansson-dev check libsubunit0 libsubunit-dev pkgconf
# pkgconf-bin libpkgconf3) into .prefix/NAME and point pkg-config and the
# loader at it.   debs_prefix NAME
debs_prefix() {
    pkg-config --exists libuv jansson check 2>/dev/null && return 0
    local prefix=$PWD/.prefix/$1 deb pc
    rm -rf "$prefix" && mkdir -p "$prefix"
    for deb in $(find .debs -name '*.deb'); do dpkg-deb -x "$deb" "$prefix"; done
    for pc in "$prefix"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc; do
        sed -i "s|=/usr|=$prefix/usr|g" "$pc"
    done
    export PKG_CONFIG_PATH=$prefix/usr/lib/x86_64-linux-gnu/pkgconfig
    export LD_LIBRARY_PATH=$prefix/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    command -v pkg-config >/dev/null || export PKG_CONFIG=$prefix/usr/bin/pkgconf
}
