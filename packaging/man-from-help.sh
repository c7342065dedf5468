#!/usr/bin/env bash
# A short troff man page from a clap `--help` text (help2man's idea, no Perl):
#   packaging/man-from-help.sh NAME SECTION VERSION [EXTRA.troff] < help.txt > NAME.SECTION
# The help's first paragraph becomes NAME and DESCRIPTION, "Usage:" SYNOPSIS,
# each "Heading:" block (Options, Commands) a section of tagged paragraphs
# (both clap layouts: description on the item's line, or indented below it),
# and text after the last block a closing paragraph. EXTRA.troff (FILES,
# SEE ALSO, ...) is appended as it is.
set -euo pipefail
name=${1:?NAME SECTION VERSION [EXTRA]} section=${2:?} version=${3:?} extra=${4:-}
upper=$(tr '[:lower:]' '[:upper:]' <<<"$name")

awk -v name="$name" -v upper="$upper" -v section="$section" -v version="$version" '
# troff-safe text: backslashes, hyphens (so options print as ASCII minus), and
# a leading dot or quote.
function esc(s) {
    gsub(/\\/, "\\e", s)
    gsub(/-/, "\\-", s)
    if (s ~ /^[.\047]/) s = "\\&" s
    return s
}
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
BEGIN { state = "about"; about = "" }
state == "about" && /^Usage: / {
    print ".TH " upper " " section " \"\" \"" name " " version "\" \"System Administration\""
    print ".SH NAME"
    split(about, first, /\n\n/)
    summary = first[1]
    # NAME: the first sentence, on one line.
    sub(/[:;].*/, "", summary)
    print esc(name) " \\- " esc(summary)
    print ".SH SYNOPSIS"
    usage = $0
    sub(/^Usage: [^ ]+ ?/, "", usage)
    print ".B " esc(name)
    if (usage != "") print esc(usage)
    print ".SH DESCRIPTION"
    n = split(about, paras, /\n\n/)
    for (i = 1; i <= n; i++) { if (i > 1) print ".PP"; print esc(paras[i]) }
    state = "body"
    next
}
state == "about" {
    line = trim($0)
    if (line == "") { if (about != "" && about !~ /\n\n$/) about = about "\n\n"; next }
    about = (about == "" || about ~ /\n\n$/) ? about line : about " " line
    next
}
/^[A-Z][A-Za-z ]*:$/ {
    h = toupper(substr($0, 1, length($0) - 1))
    print ".SH " h
    inblock = 1
    next
}
/^$/ { next }
inblock && /^  +[^ ]/ {
    line = $0
    indent = match(line, /[^ ]/) - 1
    line = trim(line)
    if (indent >= 10 && tagged) { print esc(line); next }
    # "ITEM  description" on one line, or ITEM alone (description below).
    if (match(line, /  +/)) {
        print ".TP"
        print ".B " esc(substr(line, 1, RSTART - 1))
        print esc(trim(substr(line, RSTART + RLENGTH)))
    } else {
        print ".TP"
        print ".B " esc(line)
    }
    tagged = 1
    next
}
{
    # Text after the blocks (an after_help).
    if (inblock) { print ".PP"; inblock = 0; tagged = 0 }
    print esc(trim($0))
}
'
if [[ -n $extra ]]; then cat "$extra"; fi
