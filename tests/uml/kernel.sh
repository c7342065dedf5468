# shellcheck shell=bash
# Sourced by install.sh and run-in-uml.sh: which UML kernel the tests boot.
#
# Debian 12's user-mode-linux (6.1) is the default. Its kernel hands the host a
# fixed-size XSAVE buffer through ptrace, which a CPU with a larger one (AVX-512,
# AMX) refuses: init dies at once ("ptrace set fp regs failed, errno = 14").
# Kernels that size the buffer from the host (Debian unstable's user-mode-linux)
# run there. install.sh then unpacks one, with the C library it needs, under
# $UML_ROOT, and everything boots that one instead.
#
# UML_ROOT is a directory laid out like / that holds usr/bin/linux.uml and
# usr/lib/uml/modules/<version>/; empty means the host's own installation.

# What the kernel prints when the host refuses its XSAVE buffer.
UML_XSAVE_REFUSED='ptrace set fp regs failed'

uml_cache=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)/target/uml
UML_ROOT=''
[ -x "$uml_cache/root/usr/bin/linux.uml" ] && UML_ROOT=$uml_cache/root
UML_KERNEL=$UML_ROOT/usr/bin/linux.uml
