# Sourced by scripts/test.sh and scripts/compare-etcd.sh.
#
# apt_install PACKAGE...: installs Debian packages without starting their
# services. Packages such as prometheus and etcd-server start a service in
# their postinst wherever they can (under systemd, or a known runlevel) and
# fail the install if that fails; the scripts start their own processes, so
# service starts are forbidden during the install (a policy-rc.d exiting
# 101, as Docker images have it) unless a policy is already in place.
apt_install() (
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/apt-install.sh: no service starts while it installs packages.\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  status=0
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } ||
    status=$?
  if [ "$status" -ne 0 ]; then
    echo "error: installing the Debian packages $* failed" >&2
  fi
  exit "$status"
)
