/* The public header must compile alone as strict C11. */
#include <qcowkit.h>
int main(void) { return qk_version_number() > 0 ? 0 : 1; }
