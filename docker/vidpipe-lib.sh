# Shell functions shared by the vidpipe images' scripts (docker/entrypoint.sh and
# docker/secrets.sh), sourced from the directory they are in: installed beside them as
# /usr/local/bin/vidpipe-lib.sh. Builtins only, so a secret passed in never reaches a
# command line.

# urlencode STRING: STRING with all but RFC 3986's unreserved characters percent-encoded.
urlencode() {
  local LC_ALL=C # byte by byte
  local s=$1 out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in
      [A-Za-z0-9._~-]) out+=$c ;;
      *) printf -v c '%%%02X' "'$c"; out+=$c ;;
    esac
  done
  printf '%s' "$out"
}
