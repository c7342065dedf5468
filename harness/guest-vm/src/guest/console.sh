# The guest side of the console protocol (see src/console.rs), on the virtio
# serial port "$1": the host sends "<token> <length>\n" and then exactly
# <length> bytes of script; the guest answers "<token> begin\n", the script's
# stdout and stderr as they come, and "\n<token> end <status>\n". A port is no
# tty: bytes cross unchanged, and a slow reader throttles the writer instead
# of losing data. The host sends the next script only after an end line, so
# `head -c` never reads past the script.
# A port opens once: one read-write open shared by stdin, stdout and stderr.
exec 3<>"$1"
exec <&3 >&3 2>&3 3>&-
# Blocks until the host's end is connected.
echo "THINBOX-READY $(uname -r)"
while read -r tok len; do
  head -c "$len" > /tmp/.thinbox-script
  echo "$tok begin"
  sh /tmp/.thinbox-script </dev/null 2>&1
  printf '\n%s end %d\n' "$tok" "$?"
done
# End of input: the host closed its end (its process died without shutting
# the guest down). Nothing can reach this guest any more: QEMU exits with it.
poweroff -f
