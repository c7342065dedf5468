# The guest side of the console protocol (see src/console.rs): the host sends
# "<token> <length>\n" and then exactly <length> bytes of script; the guest
# answers "<token> begin\n", the script's stdout and stderr as they come, and
# "\n<token> end <status>\n". The tty is raw (no echo, no CR/LF mapping), so
# the bytes cross unchanged. The host sends the next script only after an end
# line, so `head -c` never reads past the script.
exec </dev/ttyS1 >/dev/ttyS1 2>&1
stty raw -echo
echo "THINBOX-READY $(uname -r)"
while read -r tok len; do
  head -c "$len" > /tmp/.thinbox-script
  echo "$tok begin"
  sh /tmp/.thinbox-script </dev/null 2>&1
  printf '\n%s end %d\n' "$tok" "$?"
done
